"""Mosaic TPU kernel bodies and ``pallas_call`` builders: forward, dQ and dK/dV.

All three walk a flat ``pallas_kernels.block_sparse.Schedule`` of the visited tiles, its four
int32 arrays (row block, sub-head, column block, flags) scalar-prefetched into SMEM:

* forward and dQ: grid ``(B, Hq, S)`` over the q-block rows' lists; step ``s`` pairs q block
  ``row[s]`` with kv block ``col[s]`` (K/V of kv head ``h // G``: GQA needs no repeated K/V);
* dK/dV: grid ``(B, Hkv, S')`` over the transposed lists, each kv block's list repeated for the
  ``G`` query heads of its group: kv block ``row[s]``, query head ``hkv * G + sub[s]``, q block
  ``col[s]``.

A row's steps are contiguous: its accumulators live in VMEM scratch from the step flagged
``first`` to the one flagged ``last``, where the output block is written. Inactive steps (an
empty row's single step, or the padding of traced lists) repeat the previous block index, so
the pipeline issues no DMA, and ``pl.when`` skips their compute.

Tiles marked FULL skip the mask; PARTIAL tiles evaluate it on position tiles (iota when
positions are ``offset + arange``, else an int32 info block) and segment-id tiles. The math
of a tile is the normalizer's (``log_weight``, ``update``, ``finalize``, see
``pallas_kernels.protocols``): forward is the online softmax over log-weights
``t = log_weight(q k^T + bias)``; backward is ``ds = dt/ds * P * (dP - D + dlse)`` with
``P = exp(t - lse)`` and ``dt/ds`` (and the gradient into the row context) from ``jax.vjp``
of ``log_weight``, so every normalizer gets an exact gradient from the same kernel.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.vma import varying_struct

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything a kernel specializes on (hashable; a ``custom_vjp`` nondiff argument).

    ``q_fields`` / ``k_fields`` name the int32 rows of the info arrays (``"pos"``, ``"seg"``,
    ``"bias"``); positions come from iota (``q_offset`` / ``k_offset`` + index) when
    ``"pos"`` is absent. ``kv_len`` is the unpadded key length; ``group`` = Hq // Hkv.
    """

    mask: Any
    normalizer: Any
    pass_idx: int
    bias_fn: Callable | None
    ctx_names: tuple[str, ...]
    q_fields: tuple[str, ...]
    k_fields: tuple[str, ...]
    q_offset: int
    k_offset: int
    block_q: int
    block_k: int
    kv_len: int
    kv_padded: bool
    group: int
    with_values: bool
    interpret: Any  # False, or a pltpu.InterpretParams


# -- one tile ------------------------------------------------------------------------------
def _q_field(st: Static, r, name, i):
    if name == "pos" and "pos" not in st.q_fields:
        return st.q_offset + i * st.block_q + jax.lax.broadcasted_iota(
            jnp.int32, (st.block_q, 1), 0)
    f = st.q_fields.index(name)
    return r["q_info"][:, f:f + 1]


def _k_field(st: Static, r, name, j):
    if name == "pos" and "pos" not in st.k_fields:
        return st.k_offset + j * st.block_k + jax.lax.broadcasted_iota(
            jnp.int32, (1, st.block_k), 1)
    f = st.k_fields.index(name)
    return r["k_info"][f:f + 1, :]


def _tile(st: Static, r, h, i, j, masked: bool):
    """``(s [bq, bk] f32, ctx {name: [bq, 1]}, visible [bq, bk] or None)``."""
    s = jax.lax.dot_general(r["q"][...], r["k"][...], _NT, preferred_element_type=jnp.float32)
    if st.bias_fn is not None:
        s = s + st.bias_fn(_q_field(st, r, "bias", i), _k_field(st, r, "bias", j),
                           r["slopes"][h])
    ctx = {n: r["ctx"][:, c:c + 1] for c, n in enumerate(st.ctx_names)}
    if not masked:
        return s, ctx, None
    vis = st.mask(_q_field(st, r, "pos", i), _k_field(st, r, "pos", j))
    if "seg" in st.q_fields:
        vis = vis & (_q_field(st, r, "seg", i) == _k_field(st, r, "seg", j))
    if st.kv_padded:
        key = j * st.block_k + jax.lax.broadcasted_iota(jnp.int32, (1, st.block_k), 1)
        vis = vis & (key < st.kv_len)
    return s, ctx, jnp.broadcast_to(vis, s.shape)


def _log_weights(st: Static, s, ctx, vis):
    t = st.normalizer.log_weight(s, ctx, st.pass_idx)
    return t if vis is None else jnp.where(vis, t, -jnp.inf)


def _grads(st: Static, r, s, ctx, vis):
    """``(P, ds, dctx)`` of one tile from the saved ``lse`` and ``base = dlse - rowsum(dO*O)``."""
    t, vjp = jax.vjp(lambda s_, c_: st.normalizer.log_weight(s_, c_, st.pass_idx), s, ctx)
    lse = r["lse"][...]
    live = jnp.isfinite(lse)
    ok = live if vis is None else live & vis
    p = jnp.where(ok, jnp.exp(t - jnp.where(live, lse, 0.0)), 0.0)
    term = r["base"][...]
    if st.with_values:
        term = term + jax.lax.dot_general(r["do"][...], r["v"][...], _NT,
                                          preferred_element_type=jnp.float32)
    ds, dctx = vjp(p * term)
    return p, ds, dctx


def _each_tile_kind(active, full, body):
    """Run ``body(masked)`` under ``pl.when``: unmasked on FULL tiles, masked on PARTIAL."""
    for masked in (False, True):
        pl.when(active & (jnp.logical_not(full) if masked else full))(
            functools.partial(body, masked))


# -- kernels -------------------------------------------------------------------------------
def _step(r):
    """``(row, sub, col, full, active, first, last)`` of this grid step (axis 2)."""
    s = pl.program_id(2)
    f = r["flags"][s]
    return (r["row"][s], r["sub"][s], r["col"][s], (f & 1) != 0, (f & 2) != 0, (f & 4) != 0,
            (f & 8) != 0)


def _fwd_kernel(st: Static, names, *refs):
    r = dict(zip(names, refs))
    h = pl.program_id(1)
    i, _, j, full, active, first, last = _step(r)
    norm = st.normalizer

    @pl.when(first)
    def _init():
        r["m"][...] = jnp.full(r["m"].shape, -jnp.inf, jnp.float32)
        r["l"][...] = jnp.zeros(r["l"].shape, jnp.float32)
        if st.with_values:
            r["acc"][...] = jnp.zeros(r["acc"].shape, jnp.float32)

    def state():
        return r["m"][...], r["l"][...], (r["acc"][...] if st.with_values else None)

    def step(masked):
        s, ctx, vis = _tile(st, r, h, i, j, masked)
        t = _log_weights(st, s, ctx, vis)
        m, l, acc = norm.update(state(), t, r["v"][...] if st.with_values else None)
        r["m"][...], r["l"][...] = m, l
        if st.with_values:
            r["acc"][...] = acc

    _each_tile_kind(active, full, step)

    @pl.when(last)
    def _finish():
        out, lse = norm.finalize(state())
        if st.with_values:
            r["o"][...] = out.astype(r["o"].dtype)
        r["lse"][...] = lse[:, None]


def _dq_kernel(st: Static, names, *refs):
    r = dict(zip(names, refs))
    h = pl.program_id(1)
    i, _, j, full, active, first, last = _step(r)

    @pl.when(first)
    def _init():
        r["dq_acc"][...] = jnp.zeros(r["dq_acc"].shape, jnp.float32)
        if st.ctx_names:
            r["dctx_acc"][...] = jnp.zeros(r["dctx_acc"].shape, jnp.float32)

    def step(masked):
        s, ctx, vis = _tile(st, r, h, i, j, masked)
        _, ds, dctx = _grads(st, r, s, ctx, vis)
        r["dq_acc"][...] += jnp.dot(ds, r["k"][...].astype(jnp.float32),
                                    preferred_element_type=jnp.float32)
        for c, n in enumerate(st.ctx_names):
            r["dctx_acc"][:, c:c + 1] += dctx[n]

    _each_tile_kind(active, full, step)

    @pl.when(last)
    def _finish():
        r["dq"][...] = r["dq_acc"][...]
        if st.ctx_names:
            r["dctx"][...] = r["dctx_acc"][...]


def _dkv_kernel(st: Static, names, *refs):
    r = dict(zip(names, refs))
    j, g, i, full, active, first, last = _step(r)
    h = pl.program_id(1) * st.group + g

    @pl.when(first)
    def _init():
        r["dk_acc"][...] = jnp.zeros(r["dk_acc"].shape, jnp.float32)
        if st.with_values:
            r["dv_acc"][...] = jnp.zeros(r["dv_acc"].shape, jnp.float32)

    def step(masked):
        s, ctx, vis = _tile(st, r, h, i, j, masked)
        p, ds, _ = _grads(st, r, s, ctx, vis)
        if st.with_values:
            r["dv_acc"][...] += jax.lax.dot_general(
                p, r["do"][...].astype(jnp.float32), _TN, preferred_element_type=jnp.float32)
        r["dk_acc"][...] += jax.lax.dot_general(
            ds, r["q"][...].astype(jnp.float32), _TN, preferred_element_type=jnp.float32)

    _each_tile_kind(active, full, step)

    @pl.when(last)
    def _finish():
        r["dk"][...] = r["dk_acc"][...]
        if st.with_values:
            r["dv"][...] = r["dv_acc"][...]


# -- pallas_call builders ------------------------------------------------------------------
_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


class _Specs:
    """Named inputs / outputs with their block specs, for one grid."""

    def __init__(self):
        self.names, self.arrays, self.specs = [], [], []

    def add(self, name, array, spec):
        if array is not None:
            self.names.append(name)
            self.arrays.append(array)
            self.specs.append(spec)


def _row_specs(st: Static, q_block, k_block, q_info_block, k_info_block):
    """Block specs for row-side (q-shaped) and column-side (k-shaped) operands of one grid."""

    def rows(x):
        return pl.BlockSpec((None, None, st.block_q, x.shape[-1]), q_block)

    def cols(x):
        return pl.BlockSpec((None, None, st.block_k, x.shape[-1]), k_block)

    def q_info(x):
        return pl.BlockSpec((None, st.block_q, x.shape[-1]), q_info_block)

    def k_info(x):
        return pl.BlockSpec((None, x.shape[1], st.block_k), k_info_block)

    return rows, cols, q_info, k_info


def _common_inputs(st: Static, ins: _Specs, spec_fns, arrays):
    rows, cols, q_info, k_info = spec_fns
    q, k, v, ctx, qi, ki, slopes = arrays
    ins.add("q", q, rows(q))
    ins.add("k", k, cols(k))
    ins.add("v", v if st.with_values else None, cols(v) if st.with_values else None)
    ins.add("ctx", ctx, None if ctx is None else rows(ctx))
    ins.add("q_info", qi, None if qi is None else q_info(qi))
    ins.add("k_info", ki, None if ki is None else k_info(ki))
    ins.add("slopes", slopes, pl.BlockSpec(memory_space=pltpu.SMEM))


_SCHEDULE = ("row", "sub", "col", "flags")


def _row_maps(st: Static):
    """Index maps of the forward / dQ grid ``(b, h, s, row, sub, col, flags)``."""

    def q_block(b, h, s, row, sub, col, flags):
        return b, h, row[s], 0

    def k_block(b, h, s, row, sub, col, flags):
        return b, h // st.group, col[s], 0

    def q_info_block(b, h, s, row, sub, col, flags):
        return b, row[s], 0

    def k_info_block(b, h, s, row, sub, col, flags):
        return b, 0, col[s]

    return q_block, k_block, q_info_block, k_info_block


def _col_maps(st: Static):
    """Index maps of the dK/dV grid ``(b, hkv, s, row=kv block, sub=head in group,
    col=q block)``."""

    def q_block(b, h, s, row, sub, col, flags):
        return b, h * st.group + sub[s], col[s], 0

    def k_block(b, h, s, row, sub, col, flags):
        return b, h, row[s], 0

    def q_info_block(b, h, s, row, sub, col, flags):
        return b, col[s], 0

    def k_info_block(b, h, s, row, sub, col, flags):
        return b, 0, row[s]

    return q_block, k_block, q_info_block, k_info_block


def _call(st: Static, body, name, sched, heads, ins, outs, scratch, cost):
    """``pallas_call`` of ``body`` on grid ``(B, heads, steps)`` with the schedule prefetched."""
    names = list(_SCHEDULE) + ins.names + outs.names + [n for n, _ in scratch]
    batch = ins.arrays[0].shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(_SCHEDULE), grid=(batch, heads, sched.steps),
        in_specs=ins.specs, out_specs=outs.specs, scratch_shapes=[v for _, v in scratch])
    return pl.pallas_call(
        functools.partial(body, st, names), out_shape=outs.arrays, grid_spec=grid_spec,
        compiler_params=_PARAMS, interpret=st.interpret, cost_estimate=cost,
        name=name)(*(getattr(sched, n) for n in _SCHEDULE), *ins.arrays)


def _out(shape, arrays) -> jax.ShapeDtypeStruct:
    """A float32 output typed like ``arrays`` inside ``jax.shard_map``."""
    return varying_struct(shape, jnp.float32, arrays)


def _grad_inputs(st: Static, ins: _Specs, rows, residuals):
    do, lse, base = residuals
    ins.add("do", do if st.with_values else None, rows(do) if st.with_values else None)
    ins.add("lse", lse, rows(lse))
    ins.add("base", base, rows(base))


def forward_call(st: Static, sched, arrays, cost):
    """``(out [B, Hq, Tq, Dv] f32 or None, lse [B, Hq, Tq, 1])`` of one pass."""
    q, v = arrays[0], arrays[2]
    b, hq, tq, _ = q.shape
    spec_fns = _row_specs(st, *_row_maps(st))
    rows = spec_fns[0]
    ins = _Specs()
    _common_inputs(st, ins, spec_fns, arrays)
    outs = _Specs()
    scratch = [("m", pltpu.VMEM((st.block_q, 1), jnp.float32)),
               ("l", pltpu.VMEM((st.block_q, 1), jnp.float32))]
    if st.with_values:
        outs.add("o", _out((b, hq, tq, v.shape[-1]), arrays[:3]), rows(v))
        scratch.append(("acc", pltpu.VMEM((st.block_q, v.shape[-1]), jnp.float32)))
    lse_shape = _out((b, hq, tq, 1), arrays[:3])
    outs.add("lse", lse_shape, rows(lse_shape))
    result = _call(st, _fwd_kernel, "block_sparse_flash_fwd", sched, hq, ins, outs, scratch,
                   cost)
    return (result[0], result[1]) if st.with_values else (None, result[0])


def dq_call(st: Static, sched, arrays, residuals, cost):
    """``(dq [B, Hq, Tq, D] f32, dctx [B, Hq, Tq, C] f32 or None)``."""
    q, ctx = arrays[0], arrays[3]
    spec_fns = _row_specs(st, *_row_maps(st))
    rows = spec_fns[0]
    ins = _Specs()
    _common_inputs(st, ins, spec_fns, arrays)
    _grad_inputs(st, ins, rows, residuals)
    outs = _Specs()
    outs.add("dq", _out(q.shape, arrays[:3]), rows(q))
    scratch = [("dq_acc", pltpu.VMEM((st.block_q, q.shape[-1]), jnp.float32))]
    if st.ctx_names:
        outs.add("dctx", _out(ctx.shape, arrays[:3]), rows(ctx))
        scratch.append(("dctx_acc", pltpu.VMEM((st.block_q, ctx.shape[-1]), jnp.float32)))
    result = _call(st, _dq_kernel, "block_sparse_flash_dq", sched, q.shape[1], ins, outs,
                   scratch, cost)
    return result[0], (result[1] if st.ctx_names else None)


def dkv_call(st: Static, sched_t, arrays, residuals, cost):
    """``(dk [B, Hkv, Tk, D] f32, dv [B, Hkv, Tk, Dv] f32 or None)`` over the transposed
    schedule (built with ``group = Hq // Hkv``)."""
    k, v = arrays[1], arrays[2]
    spec_fns = _row_specs(st, *_col_maps(st))
    rows, cols = spec_fns[:2]
    ins = _Specs()
    _common_inputs(st, ins, spec_fns, arrays)
    _grad_inputs(st, ins, rows, residuals)
    outs = _Specs()
    outs.add("dk", _out(k.shape, arrays[:3]), cols(k))
    scratch = [("dk_acc", pltpu.VMEM((st.block_k, k.shape[-1]), jnp.float32))]
    if st.with_values:
        outs.add("dv", _out(v.shape, arrays[:3]), cols(v))
        scratch.append(("dv_acc", pltpu.VMEM((st.block_k, v.shape[-1]), jnp.float32)))
    result = _call(st, _dkv_kernel, "block_sparse_flash_dkv", sched_t, k.shape[1], ins, outs,
                   scratch, cost)
    return result[0], (result[1] if st.with_values else None)
