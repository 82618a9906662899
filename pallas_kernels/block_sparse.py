"""Block-sparse metadata: which kv blocks each q block must visit, from a mask's tile classes.

For a q block ``i`` the visited kv blocks are ``kv_index[i, :kv_count[i]]`` (ascending); the
rest of the row repeats the last useful index, so a kernel's index map fetches nothing new on
padding steps. ``kv_full`` marks FULL tiles, where a kernel may skip evaluating the mask.
With numpy positions and no segment ids the lists are static numpy arrays whose width is the
largest row count (a Λ-mask gives a short grid whatever T is); with traced positions or
segment ids they are jnp arrays of width ``num_kv_blocks``. Tile classes come from the mask's
analytic ``classify`` on per-tile position bounds (taken over the batch), refined by segment-id
bounds: disjoint segment ranges make a tile EMPTY, a tile is FULL only within one segment.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import jax.numpy as jnp

from pallas_kernels.protocols import EMPTY, FULL, PARTIAL, MaskLike


@dataclasses.dataclass(frozen=True)
class BlockLists:
    """``kv_index [nq, W]``, ``kv_count [nq]``, ``kv_full [nq, W]``; numpy or jnp."""

    kv_index: Any
    kv_count: Any
    kv_full: Any

    @property
    def static(self) -> bool:
        return isinstance(self.kv_index, np.ndarray)


def _bounds(xp, values, block):
    v = xp.asarray(values).reshape(-1, values.shape[-1] // block, block)
    return v.min(axis=(0, 2)), v.max(axis=(0, 2))


def tile_classes(mask: MaskLike, q_pos, k_pos, block_q: int, block_k: int, q_seg=None,
                 kv_seg=None):
    """``[nq, nk]`` EMPTY/PARTIAL/FULL for positions ``[B, Tq]`` / ``[B, Tk]`` (multiples of blocks)."""
    for name, arr, blk in (("q_pos", q_pos, block_q), ("k_pos", k_pos, block_k)):
        if arr.shape[-1] % blk:
            raise ValueError(f"`{name}` length {arr.shape[-1]} is not a multiple of its block "
                             f"size {blk}; pad it first")
    traced = any(isinstance(a, jax.Array) for a in (q_pos, k_pos, q_seg, kv_seg))
    xp = jnp if traced else np
    qlo, qhi = _bounds(xp, q_pos, block_q)
    klo, khi = _bounds(xp, k_pos, block_k)
    cls = xp.asarray(mask.classify(qlo[:, None], qhi[:, None], klo[None, :], khi[None, :]))
    if q_seg is not None:
        slo, shi = _bounds(xp, q_seg, block_q)
        tlo, thi = _bounds(xp, kv_seg, block_k)
        disjoint = (shi[:, None] < tlo[None, :]) | (thi[None, :] < slo[:, None])
        single = (slo == shi)[:, None] & (tlo == thi)[None, :] & (slo[:, None] == tlo[None, :])
        cls = xp.where(disjoint, EMPTY, xp.where((cls == FULL) & ~single, PARTIAL, cls))
    return cls.astype(np.int8)


def block_lists(classes) -> BlockLists:
    """Compact per-row lists of non-empty kv blocks from ``[nq, nk]`` tile classes."""
    xp = np if isinstance(classes, np.ndarray) else jnp
    nonempty = classes != EMPTY
    count = nonempty.sum(axis=1).astype(np.int32)
    order = (np.argsort(~nonempty, axis=1, kind="stable") if xp is np
             else jnp.argsort(~nonempty, axis=1, stable=True))
    width = max(int(count.max()), 1) if xp is np else classes.shape[1]
    order = order[:, :width].astype(np.int32)
    last = xp.take_along_axis(order, xp.maximum(count - 1, 0)[:, None], axis=1)
    index = xp.where(xp.arange(width)[None, :] < count[:, None], order, last)
    full = xp.take_along_axis(classes, index, axis=1) == FULL
    return BlockLists(index, count, full & (xp.arange(width)[None, :] < count[:, None]))


def visit_stats(lists: BlockLists) -> dict:
    """What a kernel walking ``lists`` row by row does, per (batch, head).

    ``grid_steps``: rows x width; ``visited_tiles``: steps that compute (FULL + PARTIAL);
    ``kv_fetches``: kv block loads, counting a load only when the block index differs from the
    previous step's (padding steps repeat the last index, so they load nothing). Traced lists
    give the upper bounds (every step visits and loads).
    """
    rows, width = lists.kv_index.shape
    if not lists.static:
        steps = rows * width
        return {"grid_steps": steps, "visited_tiles": steps, "full_tiles": 0,
                "partial_tiles": steps, "kv_fetches": steps}
    flat = lists.kv_index.reshape(-1)
    full = int(lists.kv_full.sum())
    visited = int(lists.kv_count.sum())
    return {"grid_steps": rows * width, "visited_tiles": visited, "full_tiles": full,
            "partial_tiles": visited - full,
            "kv_fetches": int(1 + np.count_nonzero(flat[1:] != flat[:-1]))}
