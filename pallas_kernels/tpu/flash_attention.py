"""Block-sparse flash attention on TPU (Mosaic): one online-softmax pass, forward and backward.

``flash_attention_pass`` computes, for each query row ``i`` of ``q [B, Hq, Tq, D]``,
``lse_i = log sum_j exp(t_ij)`` and ``out_i = sum_j exp(t_ij - lse_i) v_j`` over the keys
visible under ``mask`` (and equal segment ids), with ``t = normalizer.log_weight(q k^T + bias,
ctx)``. Multi-pass normalizers (LSSAR) and branch merges (LM-Infinite) are the caller's: it
combines passes with the normalizer's ``merge``. GQA: ``k``/``v`` have ``Hkv`` heads, query
head ``h`` reads kv head ``h // (Hq // Hkv)``.

Here: block sizes (``BlockSizes``: the forward kernel tiles with ``forward``, the dQ and dK/dV
kernels with ``backward``), padding (sequences of any length are padded to a length both
tilings divide; padded keys are masked in the kernel), the block lists and their flat schedules
(``pallas_kernels.block_sparse``; static numpy when positions are numpy and there are no segment
ids, else traced), the int32 info arrays, the ``custom_vjp`` that wires the dQ and dK/dV
kernels, and ``pl.CostEstimate`` from the schedules.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import block_sparse
from pallas_kernels.block_sizes import BlockSizes, for_lengths, tilings
from pallas_kernels.block_sparse import pad_axis
from pallas_kernels.protocols import Bias
from pallas_kernels.tpu import kernels

SUBLANES, LANES = 8, 128  # TPU tiling: blocks are multiples of these (or the whole axis)


def block_shape(tq: int, tk: int, blocks: tuple[int, int], *, interpret: bool,
                backward: bool = False) -> tuple[int, int]:
    """``blocks = (block_q, block_k)`` (of the forward pass, or the ``backward`` one) clipped
    to the sequences; on hardware, checked against TPU tiling."""
    bq, bk = for_lengths(blocks, tq, tk)
    if not interpret:
        suffix = "_bwd" if backward else ""
        for name, blk, length, unit in ((f"block_q{suffix}", bq, tq, SUBLANES),
                                        (f"block_k{suffix}", bk, tk, LANES)):
            if blk % unit and blk != length:
                raise ValueError(
                    f"`block_sizes`: on TPU {name} must be a multiple of {unit} or cover the "
                    f"whole sequence ({length}); got {blk}. Sequences of any length are padded, "
                    f"so e.g. {name}={max(unit, blk // unit * unit)} works")
    return bq, bk


def _info(fields: dict, axis: int):
    """``(names, int32 [B, T, F] or [B, F, T] stacked along axis, or None)`` of the given fields."""
    names = tuple(n for n, a in fields.items() if a is not None)
    if not names:
        return names, None
    return names, jnp.stack([jnp.asarray(fields[n], jnp.int32) for n in names], axis=axis)


def _costs(scheds, blocks, shapes):
    """``pl.CostEstimate`` of the forward, dQ and dK/dV kernels from their schedules and the
    forward / backward tilings."""
    (b, hq, hkv, tq, d), dv, vbytes = shapes
    q_bytes = b * hq * tq * (d * 4 + 4 * (dv + 4))

    def terms(sched, tiling):  # (visited tiles, K/V bytes, matmul flops per tile, tile size)
        bq, bk = tiling
        stats = block_sparse.visit_stats(sched)
        return (b * hq * stats["visited_tiles"],
                b * hq * stats["block_fetches"] * bk * (d * 4 + dv * vbytes),
                2 * bq * bk * (d + dv), bq * bk)

    tiles, kv_bytes, mm, area = terms(scheds[0], blocks[0])
    tiles_b, kv_bytes_b, mm_b, area_b = terms(scheds[1], blocks[1])
    q_fetches = block_sparse.visit_stats(scheds[2])["block_fetches"]
    return (pl.CostEstimate(flops=tiles * mm, transcendentals=tiles * area,
                            bytes_accessed=q_bytes + kv_bytes),
            pl.CostEstimate(flops=tiles_b * 2 * mm_b, transcendentals=tiles_b * area_b,
                            bytes_accessed=2 * q_bytes + kv_bytes_b),
            pl.CostEstimate(flops=tiles_b * 2 * mm_b, transcendentals=tiles_b * area_b,
                            bytes_accessed=b * hkv * q_fetches * blocks[1][0] * 4 * (d + dv + 3)
                            + 2 * kv_bytes_b))


def flash_attention_pass(q, k, v, ctx: dict, *, mask, normalizer, pass_idx: int = 0,
                         q_positions, k_positions, q_segment_ids=None, kv_segment_ids=None,
                         bias: Bias | None = None,
                         block_sizes: BlockSizes | tuple[int, int] | None = None,
                         interpret=False):
    """One pass: ``(out [B, Hq, Tq, Dv] float32 or None, lse [B, Hq, Tq])``.

    Args:
      q: ``[B, Hq, Tq, D]``; k: ``[B, Hkv, Tk, D]``; v: ``[B, Hkv, Tk, Dv]`` or None (a pass
        that only collects row sums).
      ctx: row context for ``normalizer.log_weight``: ``{name: float32 [B, Hq, Tq]}``.
      mask: a ``MaskLike``; normalizer: a ``NormalizerLike``; pass_idx: its pass.
      q_positions, k_positions: int32 ``[B, T]``; numpy arrays give static block lists (and
        iota positions in the kernel when they are ``offset + arange``).
      q_segment_ids, kv_segment_ids: optional int32 ``[B, T]``.
      bias: optional additive score bias (``Bias``).
      block_sizes: ``BlockSizes.of(block_sizes)`` (default 512 x 512): the forward kernel
        tiles with ``.forward``, the dQ and dK/dV kernels with ``.backward``.
      interpret: True runs the kernels in TPU interpret mode (``pltpu.InterpretParams()``);
        an ``InterpretParams`` instance configures the interpreter.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    if hq % hk:
        raise ValueError(f"GQA: query heads ({hq}) must be a multiple of kv heads ({hk})")
    with_values = v is not None
    if interpret is True:
        interpret = pltpu.InterpretParams()
    blocks = BlockSizes.of(block_sizes)
    block_shape(tq, tk, blocks.forward, interpret=bool(interpret))
    block_shape(tq, tk, blocks.backward, interpret=bool(interpret), backward=True)
    (tq_p, tk_p), fwd, bwd = tilings(blocks, tq, tk)
    q_off, k_off, qp, kp, qs, ks = block_sparse.padded_rows(
        q_positions, k_positions, q_segment_ids, kv_segment_ids, tq_p, tk_p)
    classes = {t: block_sparse.padded_tile_classes(mask, qp, kp, t, qs, ks, tk) for t in {fwd, bwd}}
    sched = block_sparse.schedule(block_sparse.block_lists(classes[fwd]))
    sched_dq = (sched if bwd == fwd
                else block_sparse.schedule(block_sparse.block_lists(classes[bwd])))
    sched_t = block_sparse.schedule(block_sparse.block_lists(classes[bwd].T), group=hq // hk)

    q_side = {"pos": None if q_off is not None else qp, "seg": qs}  # iota needs no field
    k_side = {"pos": None if k_off is not None else kp, "seg": ks}
    if bias is not None:
        q_side["bias"] = pad_axis(jnp.asarray(bias.q_positions), tq_p, 1, edge=True)
        k_side["bias"] = pad_axis(jnp.asarray(bias.k_positions), tk_p, 1, edge=True)
    q_fields, q_info = _info(q_side, axis=-1)
    k_fields, k_info = _info(k_side, axis=1)
    ctx_names = tuple(ctx)
    ctx_arr = (jnp.stack([pad_axis(jnp.asarray(ctx[n], jnp.float32), tq_p, 2) for n in ctx_names],
                         axis=-1) if ctx_names else None)
    slopes = None if bias is None else jnp.asarray(bias.slopes, jnp.float32).reshape(hq)
    dv = v.shape[-1] if with_values else 0
    st = kernels.Static(
        mask=mask, normalizer=normalizer, pass_idx=pass_idx,
        bias_fn=None if bias is None else bias.fn, ctx_names=ctx_names,
        q_fields=q_fields, k_fields=k_fields, q_offset=q_off or 0,
        k_offset=k_off or 0, block_q=fwd[0], block_k=fwd[1], kv_len=tk, kv_padded=tk_p != tk,
        group=hq // hk, with_values=with_values, interpret=interpret or False)
    statics = (st, dataclasses.replace(st, block_q=bwd[0], block_k=bwd[1]))
    scheds = (sched, sched_dq, sched_t)
    costs = _costs(scheds, (fwd, bwd), ((b, hq, hk, tq_p, d), dv,
                                        jnp.dtype(v.dtype).itemsize if with_values else 0))
    meta = tuple((x.row, x.sub, x.col, x.flags) for x in scheds)
    v_p = pad_axis(v, tk_p, 2) if with_values else None
    out, lse = _flash(statics, costs, meta, pad_axis(q, tq_p, 2), pad_axis(k, tk_p, 2), v_p,
                      ctx_arr, q_info, k_info, slopes)
    return (out[:, :, :tq] if with_values else None), lse[:, :, :tq, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(statics, costs, meta, q, k, v, ctx, q_info, k_info, slopes):
    """Padded ``(out, lse)``; ``statics``: forward and backward ``kernels.Static``; ``meta``:
    the forward, dQ and dK/dV schedules' arrays."""
    return kernels.forward_call(statics[0], block_sparse.Schedule(*meta[0]),
                                (q, k, v, ctx, q_info, k_info, slopes), costs[0])


def _flash_fwd(statics, costs, meta, q, k, v, ctx, q_info, k_info, slopes):
    out, lse = _flash(statics, costs, meta, q, k, v, ctx, q_info, k_info, slopes)
    return (out, lse), (meta, q, k, v, ctx, q_info, k_info, slopes, out, lse)


def _flash_bwd(statics, costs, res, cts):
    st = statics[1]
    meta, q, k, v, ctx, q_info, k_info, slopes, out, lse = res
    dout, dlse = cts
    arrays = (q, k, v, ctx, q_info, k_info, slopes)
    base = dlse
    if st.with_values:
        base = base - jnp.sum(dout * out, axis=-1, keepdims=True)
    residuals = (dout, lse, base)
    dq, dctx = kernels.dq_call(st, block_sparse.Schedule(*meta[1]), arrays, residuals, costs[1])
    dk, dv = kernels.dkv_call(st, block_sparse.Schedule(*meta[2]), arrays, residuals, costs[2])
    return (None, dq.astype(q.dtype), dk.astype(k.dtype),
            dv.astype(v.dtype) if st.with_values else None, dctx, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
