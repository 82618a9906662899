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
import jax.numpy as jnp
import numpy as np

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


def pad_axis(x, length: int, axis: int, *, edge: bool = False):
    """Pad ``x`` (numpy or jnp) at the end of ``axis`` to ``length``: zeros, or the last value
    repeated (``edge``: positions and segment ids, so tile bounds stay those of real tokens)."""
    extra = length - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.pad(x, widths, mode="edge" if edge else "constant")


def tile_classes(mask: MaskLike, q_pos, k_pos, block_q: int, block_k: int, q_seg=None,
                 kv_seg=None):
    """``[nq, nk]`` EMPTY/PARTIAL/FULL for positions ``[B, Tq]`` / ``[B, Tk]`` (lengths multiples
    of the blocks)."""
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


def iota_offset(pos) -> int | None:
    """``c`` when static ``pos [B, T]`` is ``c + arange(T)`` in every row, else None."""
    if not isinstance(pos, np.ndarray):
        return None
    c = int(pos[0, 0])
    return c if np.array_equal(pos, c + np.arange(pos.shape[1])[None, :].repeat(len(pos), 0)) \
        else None


def padded_positions(pos, offset, length):
    """``pos [B, T]`` padded to ``length`` (``offset + arange`` when static iota, else edge
    values)."""
    if offset is not None:
        return np.broadcast_to(offset + np.arange(length, dtype=np.int32), (pos.shape[0], length))
    return pad_axis(pos, length, 1, edge=True)


def padded_rows(q_positions, k_positions, q_segment_ids, kv_segment_ids, tq_p: int, tk_p: int):
    """``(q_off, k_off, qp, kp, qs, ks)``: each side's iota offset (``iota_offset``) and its
    positions and segment ids (or None) padded to ``tq_p`` / ``tk_p``."""
    q_off, k_off = iota_offset(q_positions), iota_offset(k_positions)
    segs = q_segment_ids is not None
    return (q_off, k_off, padded_positions(q_positions, q_off, tq_p),
            padded_positions(k_positions, k_off, tk_p),
            pad_axis(q_segment_ids, tq_p, 1, edge=True) if segs else None,
            pad_axis(kv_segment_ids, tk_p, 1, edge=True) if segs else None)


def padded_tile_classes(mask, qp, kp, tiling, qs, ks, kv_len: int):
    """``[nq, nk]`` classes of one tiling of the padded positions: kv blocks holding only padded
    keys are EMPTY, and one holding some is never FULL (its mask drops them)."""
    bq, bk = tiling
    classes = tile_classes(mask, qp, kp, bq, bk, qs, ks)
    if kp.shape[1] == kv_len:
        return classes
    xp = np if isinstance(classes, np.ndarray) else jnp
    start = np.arange(classes.shape[1]) * bk
    classes = xp.where(start + bk > kv_len, xp.where(classes == FULL, PARTIAL, classes), classes)
    return xp.where(start >= kv_len, EMPTY, classes).astype(np.int8)


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



@dataclasses.dataclass(frozen=True)
class Schedule:
    """A flat kernel grid over the visited tiles: step ``s`` pairs row block ``row[s]`` with
    column block ``col[s]`` for sub-head ``sub[s]`` (GQA: the query head within a kv group).

    ``flags[s]`` bits: 1 FULL tile, 2 active (compute), 4 first step of its (row, sub...) output
    block, 8 last. Steps of one output row are contiguous, so an accumulator lives in scratch
    from ``first`` to ``last`` and the output block is written once. Static lists give exactly
    the visited tiles (plus one inactive step per empty row, which writes its zero output);
    traced lists give ``rows * group * width`` steps whose padding steps repeat the previous
    column (no DMA) and are inactive.
    """

    row: Any
    sub: Any
    col: Any
    flags: Any

    FULL, ACTIVE, FIRST, LAST = 1, 2, 4, 8

    @property
    def steps(self) -> int:
        return int(self.row.shape[0])


def schedule(lists: BlockLists, group: int = 1) -> Schedule:
    """Flatten ``lists`` row by row; each row repeats its list for ``group`` sub-heads."""
    xp = np if lists.static else jnp
    rows, width = lists.kv_index.shape
    count = lists.kv_count
    if lists.static:  # exactly the visited tiles; an empty row keeps one inactive step
        per_row = np.maximum(count, 1)
        row = np.repeat(np.arange(rows), per_row * group)
        starts = np.repeat(np.cumsum(per_row * group) - per_row * group, per_row * group)
        local = np.arange(row.size) - starts
        sub, jj = local // per_row[row], local % per_row[row]
        active = jj < count[row]
        length = per_row[row]
    else:
        row = jnp.repeat(jnp.arange(rows), group * width)
        local = jnp.tile(jnp.arange(group * width), rows)
        sub, jj = local // width, local % width
        active = jj < count[row]
        length = width
    col = lists.kv_index[row, jj]
    full = lists.kv_full[row, jj] & active
    first = (sub == 0) & (jj == 0)
    last = (sub == group - 1) & (jj == length - 1)
    if lists.static:  # an empty row's step reuses the previous step's column: no DMA
        prev = np.concatenate([[col[0]], col[:-1]])
        col = np.where(active, col, prev)
    flags = (full * Schedule.FULL + active * Schedule.ACTIVE + first * Schedule.FIRST
             + last * Schedule.LAST)
    return Schedule(*(xp.asarray(a).astype(np.int32) for a in (row, sub, col, flags)))


def visit_stats(sched: Schedule) -> dict:
    """What a kernel walking ``sched`` does per (batch, head): ``grid_steps``;
    ``visited_tiles`` (active steps; ``full_tiles`` of them skip the mask); ``block_fetches``:
    column-block loads, counted only where ``(sub, col)`` differs from the previous step's (when
    the Pallas pipeline issues a DMA). Traced schedules give upper bounds."""
    steps = sched.steps
    if not isinstance(sched.flags, np.ndarray):
        return {"grid_steps": steps, "visited_tiles": steps, "full_tiles": 0,
                "partial_tiles": steps, "block_fetches": steps}
    active = (sched.flags & Schedule.ACTIVE) != 0
    full = int(((sched.flags & Schedule.FULL) != 0).sum())
    key = sched.col.astype(np.int64) * (int(sched.sub.max()) + 1) + sched.sub
    return {"grid_steps": steps, "visited_tiles": int(active.sum()), "full_tiles": full,
            "partial_tiles": int(active.sum()) - full,
            "block_fetches": int(1 + np.count_nonzero(key[1:] != key[:-1]))}
