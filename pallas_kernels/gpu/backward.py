"""Mosaic GPU (sm_90a) block-sparse flash attention backward: the dQ and the dK/dV kernels.

The gradient of one pass (``pallas_kernels.gpu.flash_attention_pass``) with the math of the
TPU kernels: on each visited tile ``P = exp(t - lse)`` with ``t = normalizer.log_weight(s,
ctx)``, ``dP = dO V^T`` and ``dS = dt/ds * P * (dP - D + dlse)``, ``D = rowsum(dO * O)``;
``dt/ds`` and the gradient into the row context ``ctx`` come from ``jax.vjp`` of
``log_weight``, so every normalizer gets an exact gradient from the same kernels.

* dQ: one thread block per ``(query head, query tile, batch)``, laid out as the forward kernel
  (``compute_wgs`` warpgroups of ``rows`` query rows; the forward's memory warpgroup streams
  K / V blocks of the tile's list): ``dQ += dS K``, ``dctx += rowsum(dctx tile)``.
* dK/dV: one thread block per ``(kv head, kv tile, batch)``; each compute warpgroup owns
  ``rows`` keys (K / V in SMEM once) and walks the transposed list (``classes.T``) once per
  query head of its GQA group (``group * count`` steps), the memory warpgroup streaming Q,
  dO, the row vectors and query info of each step; tiles are ``[keys, queries]``, so
  ``dV += P^T dO`` and ``dK += dS^T Q`` take ``P^T`` / ``dS^T`` as register WGMMA operands and
  the group's sum stays in f32 registers.

FULL tiles skip the mask; PARTIAL tiles evaluate it on position tiles (iota, or rows copied
from GMEM), segment ids and padded keys. Gradients are accumulated in f32 registers and
written once in q's dtype (through the operand's SMEM tile, which the epilogue reuses); the
entry returns them as float32. In the interpreter (``interpret``) the WGMMAs with transposed
or register operands are plain dots of the same bf16 / fp16 operands, as in the forward.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import block_sparse
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.block_sparse import pad_axis
from pallas_kernels.gpu import flash_attention as fa
from pallas_kernels.gpu import kernels
from pallas_kernels.gpu.kernels import (
    COL,
    LOG2E,
    ROW,
    cast_layout,
    copy_in,
    iota_tile,
    load_ref,
    qk_scores,
    smem_tile,
    split_pair,
    split_scratch,
    wait_for,
)
from pallas_kernels.gpu.lowerable import log_weight_vjp

# (block_q, block_k), the first that fits SMEM: 64-row dQ tiles, 2 x 64-key dK/dV tiles
DEFAULT_BWD_BLOCKS = ((64, 128), (64, 64))
OWNER = "pallas_kernels.gpu.flash_attention_bwd"
WGMMA = plgpu.Layout.WGMMA


@dataclasses.dataclass(frozen=True)
class Static:
    """What both kernels specialize on (fields as in ``kernels.Static``); ``rows``: rows of
    the thread block's own axis per compute warpgroup (queries for dQ, keys for dK/dV)."""

    mask: Any
    normalizer: Any
    pass_idx: int
    ctx_names: tuple[str, ...]
    q_fields: tuple[str, ...]
    k_fields: tuple[str, ...]
    q_offset: int
    k_offset: int
    block_q: int
    block_k: int
    rows: int
    compute_wgs: int
    stages: int
    kv_len: int
    kv_padded: bool
    group: int
    with_values: bool
    interpret: bool
    bias_fn: Any = None
    split_qk: bool = False


def _wgs(block: int) -> int:
    """Compute warpgroups of a tile of ``block`` rows (64 each up to 128, else 128 each)."""
    return 2 if block % 128 == 0 and block < 256 else max(block // 128, 1)


def _mm(st: Static, acc, a, b_smem):
    """``acc + a @ b`` with ``a`` in registers (WGMMA in place; interpreter: a plain dot)."""
    a = a.astype(b_smem.dtype)
    if st.interpret:
        return acc + jnp.dot(a, b_smem[...], preferred_element_type=jnp.float32)

    def mm(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)

    return pl.run_state(mm)(plgpu.ACC.init(acc))


def _vector(st: Static, ref, shape, dim):
    """An SMEM row broadcast along the other axis of a tile (``dim``: the row's axis)."""
    return lax.broadcast_in_dim(load_ref(st, ref, ROW if dim == 0 else COL), shape, [dim])


def _field(st: Static, name, fields, offset, smem, start, shape, dim):
    """A position / segment-id tile of one side: iota for absent positions, else its row."""
    if name == "pos" and "pos" not in fields:
        return offset + start + iota_tile(st, shape, dim)
    return _vector(st, smem.at[fields.index(name)], shape, dim)


def _at(r, name, index):
    """``r[name].at[index]``, or None where the kernel has no such scratch."""
    return r[name].at[index] if name in r else None


def _visible(st: Static, qi, ki, q0, k0, shape, qdim):
    """Bool tile: mask, equal segment ids, real keys; ``qdim`` the query axis of the tile."""
    kdim = 1 - qdim
    vis = st.mask(_field(st, "pos", st.q_fields, st.q_offset, qi, q0, shape, qdim),
                  _field(st, "pos", st.k_fields, st.k_offset, ki, k0, shape, kdim))
    if "seg" in st.q_fields:
        vis = vis & (_field(st, "seg", st.q_fields, 0, qi, q0, shape, qdim)
                     == _field(st, "seg", st.k_fields, 0, ki, k0, shape, kdim))
    if st.kv_padded:
        vis = vis & (k0 + iota_tile(st, shape, kdim) < st.kv_len)
    return vis


def _grads(st: Static, s, vec, dp, full, visible):
    """``(P, dS, dctx tiles)`` of one tile; ``vec``: the broadcast ``[lse, base, *ctx]``."""
    ctx = dict(zip(st.ctx_names, vec[2:]))
    t = st.normalizer.log_weight(s, ctx, st.pass_idx)
    t = cast_layout(st, t, WGMMA)  # a constant log-weight (a splat) gets the tile's layout
    t = lax.cond(full, lambda t: t, lambda t: jnp.where(visible(), t, -jnp.inf), t)
    lse = vec[0]
    live = lse > -jnp.inf
    p = jnp.where(live, jnp.exp2((t - jnp.where(live, lse, 0.0)) * LOG2E), 0.0)
    ds, dctx = log_weight_vjp(st.normalizer, st.pass_idx, s, ctx,
                              p * (vec[1] if dp is None else dp + vec[1]))
    return p, cast_layout(st, ds, WGMMA), {n: cast_layout(st, g, WGMMA) for n, g in dctx.items()}


# -- dQ --------------------------------------------------------------------------------------
def _dq_compute(st: Static, r, b, h, i, wg, count):
    plgpu.set_max_registers(232, action="increase")
    q_smem = r["q_smem"].at[wg]
    row0 = i * st.block_q + wg * st.rows
    rows = pl.ds(row0, st.rows)
    plgpu.copy_gmem_to_smem(r["q"].at[b, h, rows], q_smem, r["q_bar"].at[wg])
    copy_in(r, "q_lo", (b, h, rows), wg)
    plgpu.copy_gmem_to_smem(r["vec"].at[b, h, :, rows], r["vec_smem"].at[wg],
                            r["vec_bar"].at[wg])
    if st.with_values:
        plgpu.copy_gmem_to_smem(r["do"].at[b, h, rows], r["do_smem"].at[wg], r["do_bar"].at[wg])
    if "q_info" in r:
        plgpu.copy_gmem_to_smem(r["q_info"].at[b, :, rows], r["qi_smem"].at[wg],
                                r["qi_bar"].at[wg])
        plgpu.barrier_wait(r["qi_bar"].at[wg])
    shape = (st.rows, st.block_k)
    plgpu.barrier_wait(r["vec_bar"].at[wg])
    vec = [_vector(st, r["vec_smem"].at[wg, c], shape, 0) for c in range(r["vec"].shape[2])]
    plgpu.barrier_wait(r["q_bar"].at[wg])
    wait_for(r, "q_lo", wg)
    if st.with_values:
        plgpu.barrier_wait(r["do_bar"].at[wg])

    def step(s, carry):
        dq, dctx = carry
        slot = lax.rem(s, st.stages)
        entry = r["lists"][i, 1 + s]
        col0 = lax.div(entry, 2) * st.block_k
        plgpu.barrier_wait(r["k_bar"].at[slot])
        wait_for(r, "k_lo", slot)
        scores = qk_scores(st, q_smem, r["k_smem"].at[slot], shape, split_pair(r, wg, slot))
        dp = None
        if st.with_values:
            plgpu.barrier_wait(r["v_bar"].at[slot])
            dp = qk_scores(st, r["do_smem"].at[wg], r["v_smem"].at[slot], shape)
        plgpu.barrier_arrive(r["v_free"].at[slot])
        if "ki_bar" in r:
            plgpu.barrier_wait(r["ki_bar"].at[slot])
        if st.bias_fn is not None:
            scores = scores + kernels.score_bias(st, r["qi_smem"].at[wg], r["ki_smem"].at[slot],
                                                 r["slopes"][h], shape)
        _, ds, dctx_t = _grads(
            st, scores, vec, dp, lax.rem(entry, 2) == 1,
            lambda: _visible(st, _at(r, "qi_smem", wg), _at(r, "ki_smem", slot), row0, col0,
                             shape, 0))
        dq = _mm(st, dq, ds, r["k_smem"].at[slot])
        plgpu.barrier_arrive(r["k_free"].at[slot])
        return dq, tuple(a + dctx_t[n].sum(axis=1) for a, n in zip(dctx, st.ctx_names))

    dq = cast_layout(st, jnp.full((st.rows, r["q"].shape[-1]), 0.0, jnp.float32), WGMMA)
    dctx = tuple(cast_layout(st, jnp.full((st.rows,), 0.0, jnp.float32), ROW) for _ in st.ctx_names)
    dq, dctx = lax.fori_loop(0, count, step, (dq, dctx))
    q_smem[...] = dq.astype(q_smem.dtype)
    for c, a in enumerate(dctx):
        r["dctx_smem"].at[wg, c][...] = a
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, r["dq"].at[b, h, rows])
    if st.ctx_names:
        plgpu.copy_smem_to_gmem(r["dctx_smem"].at[wg], r["dctx"].at[b, h, :, rows])
    plgpu.wait_smem_to_gmem(0)


def _dq_kernel(st: Static, names, *refs):
    r = dict(zip(names, refs))
    b, h, i = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("tile")
    wg = lax.axis_index("wg")
    count = r["lists"][i, 0]
    pl.when(wg < st.compute_wgs)(lambda: _dq_compute(st, r, b, h, i, wg, count))
    pl.when(wg == st.compute_wgs)(lambda: kernels.memory_warpgroup(st, r, b, h, i, count))


# -- dK / dV ---------------------------------------------------------------------------------
def _dkv_compute(st: Static, r, b, hk, w, j, start, count, wg):
    """Work item ``w``: kv tile ``j``'s list entries ``[start, start + count)``."""
    plgpu.set_max_registers(232, action="increase")
    k_smem = r["k_smem"].at[wg]
    k0 = j * st.block_k + wg * st.rows
    keys = pl.ds(k0, st.rows)
    plgpu.copy_gmem_to_smem(r["k"].at[b, hk, keys], k_smem, r["k_bar"].at[wg])
    copy_in(r, "k_lo", (b, hk, keys), wg)
    if st.with_values:
        plgpu.copy_gmem_to_smem(r["v"].at[b, hk, keys], r["v_smem"].at[wg], r["v_bar"].at[wg])
    if "k_info" in r:
        plgpu.copy_gmem_to_smem(r["k_info"].at[b, :, keys], r["ki_smem"].at[wg],
                                r["ki_bar"].at[wg])
        plgpu.barrier_wait(r["ki_bar"].at[wg])
    plgpu.barrier_wait(r["k_bar"].at[wg])
    wait_for(r, "k_lo", wg)
    if st.with_values:
        plgpu.barrier_wait(r["v_bar"].at[wg])
    shape = (st.rows, st.block_q)

    def step(s, carry):
        dk, dv = carry
        slot = lax.rem(s, st.stages)
        entry = r["lists"][j, 1 + start + lax.rem(s, count)]
        q0 = lax.div(entry, 2) * st.block_q
        plgpu.barrier_wait(r["q_bar"].at[slot])
        wait_for(r, "q_lo", slot)
        lo = split_pair(r, slot, wg)
        scores = qk_scores(st, k_smem, r["q_smem"].at[slot], shape,  # S^T = K Q^T
                           None if lo is None else lo[::-1])
        plgpu.barrier_wait(r["vec_bar"].at[slot])
        vec = [_vector(st, r["vec_smem"].at[slot, c], shape, 1)
               for c in range(r["vec"].shape[2])]
        dp = None
        if st.with_values:
            plgpu.barrier_wait(r["do_bar"].at[slot])
            dp = qk_scores(st, r["v_smem"].at[wg], r["do_smem"].at[slot], shape)  # dP^T = V dO^T
        if "qi_bar" in r:
            plgpu.barrier_wait(r["qi_bar"].at[slot])
        if st.bias_fn is not None:   # the tile is keys x queries; query head of step s
            scores = scores + kernels.score_bias(
                st, r["qi_smem"].at[slot], r["ki_smem"].at[wg],
                r["slopes"][hk * st.group + lax.div(s, count)], shape, qdim=1)
        p, ds, _ = _grads(
            st, scores, vec, dp, lax.rem(entry, 2) == 1,
            lambda: _visible(st, _at(r, "qi_smem", slot), _at(r, "ki_smem", wg), q0, k0,
                             shape, 1))
        if st.with_values:
            dv = _mm(st, dv, p, r["do_smem"].at[slot])
        dk = _mm(st, dk, ds, r["q_smem"].at[slot])
        plgpu.barrier_arrive(r["q_free"].at[slot])
        return dk, dv

    def zeros(d):
        return cast_layout(st, jnp.full((st.rows, d), 0.0, jnp.float32), WGMMA)

    dk = zeros(r["k"].shape[-1])
    dv = zeros(r["v"].shape[-1]) if st.with_values else None
    dk, dv = lax.fori_loop(0, count * st.group, step, (dk, dv))
    k_smem[...] = dk.astype(k_smem.dtype)
    if st.with_values:
        r["v_smem"].at[wg][...] = dv.astype(k_smem.dtype)
    plgpu.commit_smem()
    part = pl.ds(w * st.block_k + wg * st.rows, st.rows)   # this item's partial dK / dV
    plgpu.copy_smem_to_gmem(k_smem, r["dk"].at[b, hk, part])
    if st.with_values:
        plgpu.copy_smem_to_gmem(r["v_smem"].at[wg], r["dv"].at[b, hk, part])
    plgpu.wait_smem_to_gmem(0)


def _dkv_memory(st: Static, r, b, hk, j, start, count):
    """The memory warpgroup: per step (query head ``g`` of the group, q block of the list),
    Q, dO, the f32 row vectors and the query info into the SMEM ring."""
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, count * st.group)
    def _fetch(s):
        slot = lax.rem(s, st.stages)
        h = hk * st.group + lax.div(s, count)
        entry = r["lists"][j, 1 + start + lax.rem(s, count)]
        rows = pl.ds(lax.div(entry, 2) * st.block_q, st.block_q)

        @pl.when(s >= st.stages)
        def _wait():
            plgpu.barrier_wait(r["q_free"].at[slot])

        plgpu.copy_gmem_to_smem(r["q"].at[b, h, rows], r["q_smem"].at[slot], r["q_bar"].at[slot])
        copy_in(r, "q_lo", (b, h, rows), slot)
        plgpu.copy_gmem_to_smem(r["vec"].at[b, h, :, rows], r["vec_smem"].at[slot],
                                r["vec_bar"].at[slot])
        if st.with_values:
            plgpu.copy_gmem_to_smem(r["do"].at[b, h, rows], r["do_smem"].at[slot],
                                    r["do_bar"].at[slot])
        if "q_info" in r:
            plgpu.copy_gmem_to_smem(r["q_info"].at[b, :, rows], r["qi_smem"].at[slot],
                                    r["qi_bar"].at[slot])

    @pl.loop(jnp.maximum(count * st.group - st.stages, 0), count * st.group)
    def _drain(s):  # observe the last releases, so every barrier phase is consumed
        plgpu.barrier_wait(r["q_free"].at[lax.rem(s, st.stages)])


def _dkv_kernel(st: Static, names, *refs):
    r = dict(zip(names, refs))
    b, hk, w = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("tile")
    wg = lax.axis_index("wg")
    j, start = r["items"][w, 0], r["items"][w, 1]
    count = r["items"][w, 2] - start
    pl.when(wg < st.compute_wgs)(lambda: _dkv_compute(st, r, b, hk, w, j, start, count, wg))
    pl.when(wg == st.compute_wgs)(lambda: _dkv_memory(st, r, b, hk, j, start, count))


def column_items(lists: block_sparse.BlockLists):
    """int32 ``[n, 4]`` work items of the dK/dV kernel, one thread block each: ``(kv tile,
    first list entry, end entry, 0)`` (rows padded to 4 int32 as ``pack_lists`` pads its
    own). Every tile's list once; with static lists, a list longer
    than twice the median non-empty length is cut into pieces of that length (Λ's sink column
    is visited by every query tile: its pieces run side by side and their partial dK / dV are
    summed after), so no thread block walks far more tiles than the others. Traced lists: one
    item per tile."""
    count = lists.kv_count
    if not lists.static:
        n = count.shape[0]
        zero = jnp.zeros(n, jnp.int32)
        return jnp.stack([jnp.arange(n, dtype=jnp.int32), zero, count.astype(jnp.int32), zero],
                         axis=1)
    busy = count[count > 0]
    piece = max(2 * int(np.median(busy)), 1) if busy.size else 1
    items = [(j, s, min(s + piece, int(c)), 0) for j, c in enumerate(count)
             for s in range(0, max(int(c), 1), piece)]
    return jnp.asarray(np.asarray(items, np.int32))


def sum_items(parts, items, shape):
    """The work items' partial sums ``[B, Hkv, n_items * block_k, D]`` added into their kv
    tiles in float32: ``[B, Hkv, Tk_padded, D]``; ``shape``: ``(B, Hkv, kv tiles, block_k)``."""
    b, hk, n_tiles, bk = shape
    parts = parts.astype(jnp.float32).reshape(b, hk, -1, bk, parts.shape[-1])
    whole = jnp.zeros((b, hk, n_tiles, bk, parts.shape[-1]), jnp.float32)
    return whole.at[:, :, items[:, 0]].add(parts).reshape(b, hk, n_tiles * bk, -1)


# -- calls -----------------------------------------------------------------------------------
def _barriers(n, **names):
    return {name: plgpu.Barrier(num_barriers=n) for name in names}


def _call(st: Static, body, ins, outs, scratch, heads, tiles, interpret):
    ins = {n: a for n, a in ins.items() if a is not None}
    names = list(ins) + list(outs) + list(scratch)
    batch = ins["q"].shape[0]
    kernel = plgpu.kernel(
        lambda *refs: body(st, names, *refs), out_type=list(outs.values()),
        scratch_types=list(scratch.values()), grid=(heads, tiles, batch),
        grid_names=("heads", "tile", "batch"), num_threads=st.compute_wgs + 1,
        thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret)
    return kernel(*ins.values())


def dq_call(st: Static, lists, q, k, v, do, vec, q_info, k_info, slopes=None, lo=(None, None),
            *, interpret=None):
    """``(dq [B, Hq, Tq, D] in q's dtype, dctx f32 [B, Hq, C, Tq] or None)``; ``vec``: f32
    ``[B, Hq, 2 + C, Tq]`` (``lse``, ``dlse - D``, ctx); ``lo``: ``(q_lo, k_lo)`` with
    ``st.split_qk``."""
    b, hq, tq, d = q.shape
    wgs, stages, n_vec = st.compute_wgs, st.stages, vec.shape[2]
    outs = {"dq": jax.ShapeDtypeStruct(q.shape, q.dtype)}
    if st.ctx_names:
        outs["dctx"] = jax.ShapeDtypeStruct((b, hq, n_vec - 2, tq), jnp.float32)
    scratch = {"q_smem": smem_tile((wgs, st.rows, d), q.dtype),
               "vec_smem": plgpu.SMEM((wgs, n_vec, st.rows), jnp.float32),
               "k_smem": smem_tile((stages, st.block_k, d), q.dtype),
               **_barriers(wgs, q_bar=1, vec_bar=1), **_barriers(stages, k_bar=1),
               "k_free": plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
               "v_free": plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
               **split_scratch(st, (wgs, st.rows), (stages, st.block_k), q.dtype, d)}
    if st.with_values:
        scratch.update(do_smem=smem_tile((wgs, st.rows, do.shape[-1]), q.dtype),
                       v_smem=smem_tile((stages, st.block_k, v.shape[-1]), q.dtype),
                       **_barriers(wgs, do_bar=1), **_barriers(stages, v_bar=1))
    if q_info is not None:
        scratch.update(qi_smem=plgpu.SMEM((wgs, q_info.shape[1], st.rows), jnp.int32),
                       **_barriers(wgs, qi_bar=1))
    if k_info is not None:
        scratch.update(ki_smem=plgpu.SMEM((stages, k_info.shape[1], st.block_k), jnp.int32),
                       **_barriers(stages, ki_bar=1))
    if st.ctx_names:
        scratch["dctx_smem"] = plgpu.SMEM((wgs, n_vec - 2, st.rows), jnp.float32)
    ins = {"lists": lists, "q": q, "k": k, "v": v if st.with_values else None, "do": do,
           "vec": vec, "q_info": q_info, "k_info": k_info, "slopes": slopes, "q_lo": lo[0],
           "k_lo": lo[1]}
    res = _call(st, _dq_kernel, ins, outs, scratch, hq, tq // st.block_q, interpret)
    return res[0], (res[1] if st.ctx_names else None)


def dkv_call(st: Static, lists_t, items, q, k, v, do, vec, q_info, k_info, slopes=None,
             lo=(None, None), *, interpret=None):
    """``(dk [B, Hkv, n·block_k, D], dv [B, Hkv, n·block_k, Dv] or None)`` in k's dtype: each
    work item's partial sum over its list entries and each kv head's query heads;
    ``lists_t``: packed lists of the transposed tile classes; ``items``: ``column_items``."""
    b, hk, _, d = k.shape
    n = items.shape[0]
    wgs, stages, n_vec = st.compute_wgs, st.stages, vec.shape[2]
    outs = {"dk": jax.ShapeDtypeStruct((b, hk, n * st.block_k, d), k.dtype)}
    scratch = {"k_smem": smem_tile((wgs, st.rows, d), k.dtype),
               "q_smem": smem_tile((stages, st.block_q, d), k.dtype),
               "vec_smem": plgpu.SMEM((stages, n_vec, st.block_q), jnp.float32),
               **_barriers(wgs, k_bar=1), **_barriers(stages, q_bar=1, vec_bar=1),
               "q_free": plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
               **split_scratch(st, (stages, st.block_q), (wgs, st.rows), k.dtype, d)}
    if st.with_values:
        outs["dv"] = jax.ShapeDtypeStruct((b, hk, n * st.block_k, v.shape[-1]), v.dtype)
        scratch.update(v_smem=smem_tile((wgs, st.rows, v.shape[-1]), k.dtype),
                       do_smem=smem_tile((stages, st.block_q, do.shape[-1]), k.dtype),
                       **_barriers(wgs, v_bar=1), **_barriers(stages, do_bar=1))
    if q_info is not None:
        scratch.update(qi_smem=plgpu.SMEM((stages, q_info.shape[1], st.block_q), jnp.int32),
                       **_barriers(stages, qi_bar=1))
    if k_info is not None:
        scratch.update(ki_smem=plgpu.SMEM((wgs, k_info.shape[1], st.rows), jnp.int32),
                       **_barriers(wgs, ki_bar=1))
    ins = {"lists": lists_t, "items": items, "q": q, "k": k,
           "v": v if st.with_values else None, "do": do if st.with_values else None,
           "vec": vec, "q_info": q_info, "k_info": k_info, "slopes": slopes, "q_lo": lo[0],
           "k_lo": lo[1]}
    res = _call(st, _dkv_kernel, ins, outs, scratch, hk, n, interpret)
    return res[0], (res[1] if st.with_values else None)


def smem_bytes(d, dv, blocks, stages, n_vec, n_qi, n_ki, split_qk) -> int:
    """The larger kernel's SMEM for 2-byte operands: operand tiles (and the low halves of
    q / k with ``split_qk``), f32 row vectors, int32 info rows, barriers."""
    bq, bk = blocks
    width, lo = 2 * (d + dv), (2 * d if split_qk else 0)
    dq = (width + lo) * (bq + stages * bk) + 4 * (bq * (2 * n_vec + n_qi) + stages * bk * n_ki)
    dkv = (width + lo) * (bk + stages * bq) + 4 * (stages * bq * (n_vec + n_qi) + bk * n_ki)
    return max(dq, dkv) + 4096  # + barriers and alignment


def flash_attention_bwd(q, k, v, ctx: dict, out, lse, dout, dlse, *, mask, normalizer,
                        pass_idx: int = 0, q_positions, k_positions, q_segment_ids=None,
                        kv_segment_ids=None, bias=None,
                        block_sizes: BlockSizes | tuple[int, int] | None = None,
                        stages: int = 2, split_qk: bool = False, interpret=None):
    """Gradients of one ``flash_attention_pass``: ``(dq, dk, dv or None, dctx or None)``.

    Args:
      q, k, v, ctx, mask, normalizer, pass_idx, positions, segment ids, bias: as given to the
        forward pass (``q [B, Hq, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]`` or
        None; bfloat16 / float16, or float32 q, k with ``split_qk``; ``ctx {name: float32
        [B, Hq, Tq]}``).
      out: the pass's ``[B, Hq, Tq, Dv]`` output (or None without values); lse: its
        ``[B, Hq, Tq]`` log-sum-exp (``-inf``: a row with no visible key, no gradient).
      dout: cotangent of ``out`` (None without values); dlse: cotangent of ``lse`` or None.
      block_sizes: ``BlockSizes.of(block_sizes).backward``: ``block_q`` query rows per dQ
        thread block and per q block of the dK/dV walk; ``block_k`` (64, 128 or 256) keys per
        kv block and per dK/dV thread block; default: the first of ``DEFAULT_BWD_BLOCKS``
        that fits SMEM (64 x 128; 64 x 64 for split operands at head_dim 128).
      stages: SMEM slots of the streamed operands (K/V for dQ; Q, dO, rows for dK/dV).
      split_qk: as for the forward: the scores from split q, k; ``dS K`` and ``dS^T Q`` take
        the high halves.
      interpret: as for ``flash_attention_pass``.

    Returns float32 ``dq [B, Hq, Tq, D]``, ``dk [B, Hkv, Tk, D]`` (summed over each kv
    head's query heads), ``dv [B, Hkv, Tk, Dv]`` or None, ``dctx {name: [B, Hq, Tq]}`` or
    None (no ctx); the kernels round them once to q's dtype.
    """
    d, dv = q.shape[-1], (0 if v is None else v.shape[-1])
    n_vec = 2 + len(ctx)

    def need(n_qi, n_ki):
        return lambda blocks: smem_bytes(d, dv, blocks, stages, n_vec, n_qi, n_ki, split_qk)

    blocks = (fa.fitting_blocks(DEFAULT_BWD_BLOCKS, need(fa.MAX_FIELDS, fa.MAX_FIELDS), OWNER,
                                "backward")
              if block_sizes is None else BlockSizes.of(block_sizes).backward)
    fa.check_inputs(q, k, v, blocks, stages, split_qk, OWNER)
    bq, bk = blocks
    if bk not in (64, 128, 256):
        raise ValueError(f"{OWNER}: block_k must be 64, 128 or 256 (64 or 128 keys per dK/dV "
                         f"compute warpgroup), got {bk}")
    b, hq, tq, _ = q.shape
    hk, tk = k.shape[1], k.shape[2]
    if hq % hk:
        raise ValueError(f"GQA: query heads ({hq}) must be a multiple of kv heads ({hk})")
    if interpret is True:
        if fa.InterpretGPUParams is None:
            raise ValueError(f"{OWNER}: interpret=True needs the Mosaic GPU interpreter, which "
                             f"jax {jax.__version__} does not expose")
        interpret = fa.InterpretGPUParams()
    if not interpret:
        fa._check_device()
    tq_p, tk_p = -(-tq // bq) * bq, -(-tk // bk) * bk
    padded = block_sparse.padded_rows(
        q_positions, k_positions, q_segment_ids, kv_segment_ids, tq_p, tk_p)
    q_off, k_off, qp, kp, qs, ks = padded
    classes = block_sparse.padded_tile_classes(mask, qp, kp, (bq, bk), qs, ks, tk)
    q_fields, q_info, k_fields, k_info, slopes = fa.info_rows(padded, bias, hq, tq_p, tk_p)
    with_values = v is not None
    base = jnp.zeros((b, hq, tq), jnp.float32) if dlse is None else dlse.astype(jnp.float32)
    if with_values:
        base = base - jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    rows = [jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, tq_p - tq)),
                    constant_values=-jnp.inf), base] + [jnp.asarray(ctx[n], jnp.float32)
                                                        for n in ctx]
    vec = jnp.stack([pad_axis(x, tq_p, 2) for x in rows], axis=2)
    fa.fitting_blocks([blocks], need(len(q_fields), len(k_fields)), OWNER, "backward")
    common = dict(mask=mask, normalizer=normalizer, pass_idx=pass_idx, ctx_names=tuple(ctx),
                  q_fields=q_fields, k_fields=k_fields, q_offset=q_off or 0,
                  k_offset=k_off or 0, block_q=bq, block_k=bk, stages=stages, kv_len=tk,
                  kv_padded=tk_p != tk, group=hq // hk, with_values=with_values,
                  interpret=bool(interpret), bias_fn=None if bias is None else bias.fn,
                  split_qk=split_qk)
    st_q = Static(rows=bq // _wgs(bq), compute_wgs=_wgs(bq), **common)
    st_k = Static(rows=bk // _wgs(bk), compute_wgs=_wgs(bk), **common)
    (q_p, q_lo), (k_p, k_lo) = (fa.split(pad_axis(q, tq_p, 2), split_qk),
                                fa.split(pad_axis(k, tk_p, 2), split_qk))
    v_p = pad_axis(v, tk_p, 2) if with_values else None
    do = pad_axis(dout.astype(q_p.dtype), tq_p, 2) if with_values else None
    interpret = interpret or None
    dq, dctx = dq_call(st_q, fa.pack_lists(block_sparse.block_lists(classes)), q_p, k_p, v_p,
                       do, vec, q_info, k_info, slopes, (q_lo, k_lo), interpret=interpret)
    lists_t = block_sparse.block_lists(classes.T)
    items = column_items(lists_t)
    dk, dv = dkv_call(st_k, fa.pack_lists(lists_t), items, q_p, k_p, v_p, do, vec, q_info,
                      k_info, slopes, (q_lo, k_lo), interpret=interpret)
    shape = (b, hk, tk_p // bk, bk)
    return (dq[:, :, :tq].astype(jnp.float32), sum_items(dk, items, shape)[:, :, :tk],
            None if dv is None else sum_items(dv, items, shape)[:, :, :tk],
            {n: dctx[:, :, c, :tq] for c, n in enumerate(ctx)} if ctx else None)
