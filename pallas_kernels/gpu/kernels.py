"""Mosaic GPU (sm_90a) block-sparse flash attention forward kernel; see ``flash_attention``.

One thread block per ``(query head, query tile, batch)``; its warpgroups:

* ``compute_wgs`` compute warpgroups, each owning ``rows`` query rows of the tile (WGMMA
  ``M = 64`` per warpgroup): Q into SMEM once, then a loop with a run-time trip count over the
  tile's list of non-empty kv blocks (``QK^T`` and ``PV`` on the tensor cores, f32 accumulators
  in registers), the online softmax of log-weights in between;
* one memory warpgroup walking the same list: TMA copies of the K / V blocks (and of their
  position / segment-id rows) into a ring of ``stages`` SMEM slots, refilling a slot once both
  compute warpgroups have released it.

The tile lists live in GMEM as one int32 row per query tile (``pack_lists``): entry 0 is the
count, entry ``1 + s`` is ``2 * kv_block + full``; GQA reads kv head ``h // group``. FULL
tiles skip the mask; PARTIAL tiles evaluate ``mask(q_pos, k_pos)`` on ``[rows, block_k]``
position tiles (iota when positions are ``offset + arange``, else rows copied from GMEM),
with segment ids and padded keys.

The log-weights are ``normalizer.log_weight(s, ctx, pass_idx)`` (the kernel's only call into
the normalizer; ``ctx`` entries arrive broadcast to ``[rows, block_k]``). The streaming state
is the normalizer protocol's ``(m, l, acc)`` written out here with ops Mosaic GPU lowers
(comparisons with ``-inf`` instead of ``isfinite``, ``exp2``): the protocol's ``update`` and
``finalize`` use ``isfinite`` and keep-dims ``[rows, 1]`` shapes, which do not lower.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
ROW = plgpu.Layout.WGMMA.reduce(1)  # a [rows] vector of a WGMMA tile
COL = plgpu.Layout.WGMMA.reduce(0)  # a [block_k] vector of a WGMMA tile


@dataclasses.dataclass(frozen=True)
class Static:
    """What the kernel specializes on. ``rows``: query rows per compute warpgroup; the query
    tile is ``compute_wgs * rows``. ``q_fields`` / ``k_fields`` name the int32 rows of the
    info arrays (``"pos"``, ``"seg"``); positions are iota (``q_offset`` / ``k_offset`` +
    index) when ``"pos"`` is absent. ``kv_len``: unpadded keys; ``group`` = Hq // Hkv."""

    mask: Any
    normalizer: Any
    pass_idx: int
    ctx_names: tuple[str, ...]
    q_fields: tuple[str, ...]
    k_fields: tuple[str, ...]
    q_offset: int
    k_offset: int
    rows: int
    block_k: int
    compute_wgs: int
    stages: int
    kv_len: int
    kv_padded: bool
    group: int
    with_values: bool
    interpret: bool  # the Mosaic GPU interpreter: no layouts, plgpu.load, run_state, or WGMMA
    # with a transposed or register operand (plain dots of the same bf16 / fp16 operands)
    bias_fn: Any = None  # protocols.Bias.fn on the "bias" info rows and slopes[h] (ALiBi)
    split_qk: bool = False  # QK^T from split operands: "q_lo" / "k_lo" beside "q" / "k"
    pingpong: bool = False  # two compute warpgroups take turns on the tensor cores

    @property
    def block_q(self) -> int:
        return self.compute_wgs * self.rows


def cast_layout(st: Static, x, layout):
    """``x`` with a register layout for the compiler (the interpreter has no layouts)."""
    return x if st.interpret else plgpu.layout_cast(x, layout)


def iota_tile(st: Static, shape, dim):
    return cast_layout(st, lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA)


def load_ref(st: Static, ref, layout):
    """A vector from SMEM in ``layout`` (interpreter: a plain read)."""
    return ref[...] if st.interpret else plgpu.load(ref, (), layout=layout)


def qk_scores(st: Static, q_smem, k_smem, shape, lo=None, issued=None):
    """``Q K^T`` in f32 (the interpreter's WGMMA takes no transposed operand: a plain dot).

    ``lo = (q_lo, k_lo)``: split operands (``x ~ x + x_lo``, each a bf16 tile, together 16
    mantissa bits): ``q_lo k^T + q k_lo^T + q k^T`` into one accumulator, small terms first
    (``q_lo k_lo^T`` is below float32's rounding of the sum and is left out). ``issued``:
    called once the WGMMAs are issued, before waiting for them (the ping-pong handover).
    """
    pairs = ([] if lo is None else [(lo[0], k_smem), (q_smem, lo[1])]) + [(q_smem, k_smem)]
    if st.interpret:
        dots = [lax.dot_general(a[...], b[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) for a, b in pairs]
        if issued is not None:
            issued()
        return functools.reduce(operator.add, dots)

    def qk(acc_ref):
        for a, b in pairs:
            plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b, (1, 0)))
        if issued is not None:
            issued()
        return acc_ref[...]

    return pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))


def split_pair(r, q_at, k_at):
    """``(q_lo, k_lo)`` SMEM tiles for ``qk_scores``, or None without split operands."""
    return (r["q_lo_smem"].at[q_at], r["k_lo_smem"].at[k_at]) if "q_lo_smem" in r else None


def copy_in(r, name, index, at):
    """TMA ``r[name].at[index]`` into SMEM tile ``at`` of ``name`` on its own barrier (if the
    kernel has ``name``)."""
    if name in r:
        plgpu.copy_gmem_to_smem(r[name].at[index], r[f"{name}_smem"].at[at],
                                r[f"{name}_bar"].at[at])


def wait_for(r, name, at):
    """Wait for ``copy_in(r, name, ..., at)`` (nothing if the kernel has no ``name``)."""
    if f"{name}_bar" in r:
        plgpu.barrier_wait(r[f"{name}_bar"].at[at])


def split_scratch(st: Static, q_tiles, k_tiles, dtype, d):
    """SMEM tiles and barriers of the low halves: ``q_tiles`` / ``k_tiles`` are
    ``(count, rows)`` of the kernel's q and k tiles; empty without split operands."""
    if not st.split_qk:
        return {}
    return {"q_lo_smem": smem_tile((*q_tiles, d), dtype),
            "k_lo_smem": smem_tile((*k_tiles, d), dtype),
            "q_lo_bar": plgpu.Barrier(num_barriers=q_tiles[0]),
            "k_lo_bar": plgpu.Barrier(num_barriers=k_tiles[0])}


def _tile_vector(x, shape, dim):
    """A ``[n]`` vector broadcast along the other axis of a ``[rows, block_k]`` tile."""
    return lax.broadcast_in_dim(x, shape, [dim])


def score_bias(st, qi, ki, slope, shape, qdim: int = 0):
    """``bias_fn`` on a tile: the query side's and the key side's "bias" rows (SMEM refs
    ``qi`` / ``ki`` of ``[fields, n]``) broadcast along the tile (``qdim``: its query axis)."""
    def side(ref, fields, dim):
        row = load_ref(st, ref.at[fields.index("bias")], ROW if dim == 0 else COL)
        return _tile_vector(row, shape, dim)

    return st.bias_fn(side(qi, st.q_fields, qdim), side(ki, st.k_fields, 1 - qdim), slope)


def _positions(st: Static, r, wg, row0, slot, col0, shape):
    """``{field: ([rows, bk] query side, [rows, bk] key side)}`` for the mask."""
    out = {}
    for name in ("pos", "seg"):
        if name == "pos" and "pos" not in st.q_fields:
            qv = st.q_offset + row0 + iota_tile(st, shape, 0)
        elif name in st.q_fields:
            f = st.q_fields.index(name)
            qv = _tile_vector(load_ref(st, r["qi_smem"].at[wg, f], ROW), shape, 0)
        else:
            continue
        if name == "pos" and "pos" not in st.k_fields:
            kv = st.k_offset + col0 + iota_tile(st, shape, 1)
        else:
            f = st.k_fields.index(name)
            kv = _tile_vector(load_ref(st, r["ki_smem"].at[slot, f], COL), shape, 1)
        out[name] = (qv, kv)
    return out


def _visible(st: Static, r, wg, row0, slot, col0, shape):
    """``[rows, block_k]`` bool: the mask, equal segment ids, real (unpadded) keys."""
    fields = _positions(st, r, wg, row0, slot, col0, shape)
    vis = st.mask(*fields["pos"])
    if "seg" in fields:
        qs, ks = fields["seg"]
        vis = vis & (qs == ks)
    if st.kv_padded:
        key = col0 + iota_tile(st, shape, 1)
        vis = vis & (key < st.kv_len)
    return vis


def _compute(st: Static, r, b, h, i, wg, count):
    """One compute warpgroup: ``rows`` query rows against the tile's kv list.

    Ping-pong (``st.pingpong``, two compute warpgroups; FlashAttention-3's schedule): a
    barrier both warpgroups pass twice per step, once after issuing ``QK^T`` and once after
    the softmax, with warpgroup 1 one pass behind; so one warpgroup's softmax runs while the
    other's matmuls hold the tensor cores. Both walk the same list (the same ``count``) and
    pass it ``2 count + 1`` times.
    """
    plgpu.set_max_registers(232, action="increase")
    turn = None
    if st.pingpong:
        def turn():
            plgpu.barrier_arrive(r["schedule"])
            plgpu.barrier_wait(r["schedule"])

        pl.when(wg == 1)(turn)
    q_smem = r["q_smem"].at[wg]
    row0 = i * st.block_q + wg * st.rows
    rows = pl.ds(row0, st.rows)
    plgpu.copy_gmem_to_smem(r["q"].at[b, h, rows], q_smem, r["q_bar"].at[wg])
    copy_in(r, "q_lo", (b, h, rows), wg)
    if "q_info" in r:
        plgpu.copy_gmem_to_smem(r["q_info"].at[b, :, rows], r["qi_smem"].at[wg],
                                r["qi_bar"].at[wg])
        plgpu.barrier_wait(r["qi_bar"].at[wg])
    shape = (st.rows, st.block_k)
    ctx = {}
    if st.ctx_names:
        plgpu.copy_gmem_to_smem(r["ctx"].at[b, h, :, rows], r["ctx_smem"].at[wg],
                                r["ctx_bar"].at[wg])
        plgpu.barrier_wait(r["ctx_bar"].at[wg])
        ctx = {n: _tile_vector(load_ref(st, r["ctx_smem"].at[wg, c], ROW), shape, 0)
               for c, n in enumerate(st.ctx_names)}
    plgpu.barrier_wait(r["q_bar"].at[wg])
    wait_for(r, "q_lo", wg)
    dv = r["v"].shape[-1] if st.with_values else 0

    def step(s, carry):
        m, l, acc = carry
        slot = lax.rem(s, st.stages)
        entry = r["lists"][i, 1 + s]
        col0 = lax.div(entry, 2) * st.block_k
        full = lax.rem(entry, 2) == 1
        plgpu.barrier_wait(r["k_bar"].at[slot])
        wait_for(r, "k_lo", slot)
        scores = qk_scores(st, q_smem, r["k_smem"].at[slot], shape, split_pair(r, wg, slot),
                           issued=turn)
        plgpu.barrier_arrive(r["k_free"].at[slot])
        if "ki_bar" in r:
            plgpu.barrier_wait(r["ki_bar"].at[slot])
        if st.bias_fn is not None:
            scores = scores + score_bias(st, r["qi_smem"].at[wg], r["ki_smem"].at[slot],
                                         r["slopes"][h], shape)
        # a constant log-weight (a splat) gets the tile's layout, as the mask branch has it
        t = cast_layout(st, st.normalizer.log_weight(scores, ctx, st.pass_idx), plgpu.Layout.WGMMA)
        t = lax.cond(full, lambda t: t,
                     lambda t: jnp.where(_visible(st, r, wg, row0, slot, col0, shape), t,
                                         -jnp.inf), t)
        m_new = jnp.maximum(m, t.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) * LOG2E
        alpha = jnp.exp2(m * LOG2E - m_safe)
        p = jnp.exp2(t * LOG2E - _tile_vector(m_safe, shape, 0))
        l = l * alpha + p.sum(axis=1)
        p_lo = p.astype(r["v"].dtype) if st.with_values else None
        if st.with_values:
            acc = acc * _tile_vector(alpha, acc.shape, 0)
        if st.pingpong:  # softmax done (kept before the handover), then wait for a turn
            if not st.interpret:
                acc, l, m_new, p_lo = lax.optimization_barrier((acc, l, m_new, p_lo))
            plgpu.barrier_arrive(r["schedule"])
        if st.with_values:
            plgpu.barrier_wait(r["v_bar"].at[slot])
        if st.pingpong:
            plgpu.barrier_wait(r["schedule"])
        if st.with_values:
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_lo, r["v_smem"].at[slot])

            if st.interpret:  # its WGMMA takes no register operand: a plain dot
                acc = acc + jnp.dot(p_lo, r["v_smem"].at[slot][...],
                                    preferred_element_type=jnp.float32)
            else:  # accumulate in place on the tensor cores
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(r["v_free"].at[slot])
        return m_new, l, acc

    m = cast_layout(st, jnp.full((st.rows,), -jnp.inf, jnp.float32), ROW)
    l = cast_layout(st, jnp.full((st.rows,), 0.0, jnp.float32), ROW)
    acc = (cast_layout(st, jnp.full((st.rows, dv), 0.0, jnp.float32), plgpu.Layout.WGMMA)
           if st.with_values else None)
    m, l, acc = lax.fori_loop(0, count, step, (m, l, acc))
    if st.pingpong:
        pl.when(wg == 0)(turn)
    live = l > 0.0
    inv = jnp.where(live, 1.0 / jnp.where(live, l, 1.0), 0.0)
    lse_smem = r["lse_smem"].at[wg]
    lse_smem[...] = jnp.where(live, m + jnp.log(jnp.where(live, l, 1.0)), -jnp.inf)
    if st.with_values:
        o_smem = r["o_smem"].at[wg]
        o_smem[...] = (acc * _tile_vector(inv, acc.shape, 0)).astype(o_smem.dtype)
    plgpu.commit_smem()
    if st.with_values:
        plgpu.copy_smem_to_gmem(o_smem, r["o"].at[b, h, rows])
    plgpu.copy_smem_to_gmem(lse_smem, r["lse"].at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def memory_warpgroup(st: Static, r, b, h, i, count):
    """The memory warpgroup: K / V (and key info) blocks of the list into the SMEM ring."""
    plgpu.set_max_registers(40, action="decrease")
    hk = lax.div(h, st.group)

    @pl.loop(0, count)
    def _fetch(s):
        slot = lax.rem(s, st.stages)
        cols = pl.ds(lax.div(r["lists"][i, 1 + s], 2) * st.block_k, st.block_k)

        @pl.when(s >= st.stages)
        def _wait_k():
            plgpu.barrier_wait(r["k_free"].at[slot])

        plgpu.copy_gmem_to_smem(r["k"].at[b, hk, cols], r["k_smem"].at[slot],
                                r["k_bar"].at[slot])
        copy_in(r, "k_lo", (b, hk, cols), slot)

        @pl.when(s >= st.stages)
        def _wait_rest():
            plgpu.barrier_wait(r["v_free"].at[slot])

        if st.with_values:
            plgpu.copy_gmem_to_smem(r["v"].at[b, hk, cols], r["v_smem"].at[slot],
                                    r["v_bar"].at[slot])
        if "k_info" in r:
            plgpu.copy_gmem_to_smem(r["k_info"].at[b, :, cols], r["ki_smem"].at[slot],
                                    r["ki_bar"].at[slot])

    @pl.loop(jnp.maximum(count - st.stages, 0), count)
    def _drain(s):  # observe the last releases, so every barrier phase is consumed
        slot = lax.rem(s, st.stages)
        plgpu.barrier_wait(r["k_free"].at[slot])
        plgpu.barrier_wait(r["v_free"].at[slot])


def _kernel(st: Static, names, *refs):
    r = dict(zip(names, refs))
    b, h, i = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tile")
    wg = lax.axis_index("wg")
    count = r["lists"][i, 0]
    pl.when(wg < st.compute_wgs)(lambda: _compute(st, r, b, h, i, wg, count))
    pl.when(wg == st.compute_wgs)(lambda: memory_warpgroup(st, r, b, h, i, count))


def smem_tile(shape, dtype):
    """An SMEM operand of WGMMA: 8 x (128 bytes) tiles, 128-byte swizzle."""
    cols = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, cols)),
                                                plgpu.SwizzleTransform(128)))


def forward_call(st: Static, lists, q, k, v, ctx, q_info, k_info, slopes=None, lo=(None, None),
                 *, interpret=None):
    """``(out [B, Hq, Tq, Dv] in q's dtype or None, lse [B, Hq, Tq] f32)`` of one pass.

    ``lists``: int32 ``[Tq / block_q, W]`` (``pack_lists``); ``ctx``: f32 ``[B, Hq, C, Tq]``
    or None; ``q_info`` / ``k_info``: int32 ``[B, F, T]`` or None; ``slopes``: f32 ``[Hq]``
    with ``st.bias_fn``; ``lo``: the low halves ``(q_lo, k_lo)`` with ``st.split_qk``.
    """
    b, hq, tq, d = q.shape
    dtype = q.dtype
    ins = {"lists": lists, "q": q, "k": k, "v": v if st.with_values else None, "ctx": ctx,
           "q_info": q_info, "k_info": k_info, "slopes": slopes, "q_lo": lo[0], "k_lo": lo[1]}
    ins = {n: a for n, a in ins.items() if a is not None}
    outs = {"lse": jax.ShapeDtypeStruct((b, hq, tq), jnp.float32)}
    wgs, stages = st.compute_wgs, st.stages
    scratch = {"q_smem": smem_tile((wgs, st.rows, d), dtype),
               "k_smem": smem_tile((stages, st.block_k, d), dtype),
               "lse_smem": plgpu.SMEM((wgs, st.rows), jnp.float32),
               "q_bar": plgpu.Barrier(num_barriers=wgs),
               "k_bar": plgpu.Barrier(num_barriers=stages),
               "k_free": plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
               "v_free": plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
               **split_scratch(st, (wgs, st.rows), (stages, st.block_k), dtype, d)}
    if st.pingpong:
        scratch["schedule"] = plgpu.Barrier(num_arrivals=wgs)
    if st.with_values:
        dv = v.shape[-1]
        outs = {"o": jax.ShapeDtypeStruct((b, hq, tq, dv), dtype), **outs}
        scratch.update(v_smem=smem_tile((stages, st.block_k, dv), dtype),
                       o_smem=smem_tile((wgs, st.rows, dv), dtype),
                       v_bar=plgpu.Barrier(num_barriers=stages))
    if q_info is not None:
        scratch.update(qi_smem=plgpu.SMEM((wgs, q_info.shape[1], st.rows), jnp.int32),
                       qi_bar=plgpu.Barrier(num_barriers=wgs))
    if k_info is not None:
        scratch.update(ki_smem=plgpu.SMEM((stages, k_info.shape[1], st.block_k), jnp.int32),
                       ki_bar=plgpu.Barrier(num_barriers=stages))
    if ctx is not None:
        scratch.update(ctx_smem=plgpu.SMEM((wgs, ctx.shape[2], st.rows), jnp.float32),
                       ctx_bar=plgpu.Barrier(num_barriers=wgs))
    names = list(ins) + list(outs) + list(scratch)

    def body(*refs):
        _kernel(st, names, *refs)

    kernel = plgpu.kernel(
        body, out_type=list(outs.values()), scratch_types=list(scratch.values()),
        grid=(hq, tq // st.block_q, b), grid_names=("heads", "q_tile", "batch"),
        num_threads=wgs + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)
    result = kernel(*ins.values())
    return (result[0], result[1]) if st.with_values else (None, result[0])
