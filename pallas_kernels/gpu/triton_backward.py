"""Block-sparse flash attention backward in Pallas Triton: the dQ and dK/dV kernels of
``triton_forward`` (GPUs without WGMMA), with the math of the Mosaic ``backward``.

On each visited tile ``P = exp(t - lse)``, ``t = normalizer.log_weight(q k^T + bias, ctx)``,
``dP = dO V^T``, ``dS = dt/ds * P * (dP - D + dlse)`` with ``D = rowsum(dO * O)``; ``dt/ds`` and
the row-context gradient from ``jax.vjp(log_weight)`` (``lowerable.log_weight_vjp``).

* dQ: one program per (query tile, query head, batch row), walking the forward's list:
  ``dQ += dS K``, ``dctx += rowsum(dctx tile)``.
* dK/dV: one program per (work item, kv head, batch row); a work item is a kv tile and a range
  of its transposed list (``backward.column_items``: Λ's long sink column is cut into pieces),
  walked once per query head of the GQA group: ``dV += P^T dO``, ``dK += dS^T Q``; the items'
  partial sums are added per tile afterwards (``backward.sum_items``).

Gradients accumulate and are written in float32 (Triton keeps them in registers; no SMEM
epilogue to share). FULL tiles skip the mask.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import block_sparse
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.block_sparse import pad_axis
from pallas_kernels.gpu.backward import column_items, sum_items
from pallas_kernels.gpu.flash_attention import pack_lists
from pallas_kernels.gpu.lowerable import log_weight_vjp
from pallas_kernels.gpu.triton_forward import (
    DEFAULT_BLOCKS,
    LOG2E,
    Static,
    call,
    key_side,
    plan,
    precision,
    query_side,
    scores_and_log_weights,
)
from pallas_kernels.vma import varying_struct

OWNER = "pallas_kernels.gpu.triton_backward.flash_attention_bwd"
F32 = jnp.float32


def _tile_grads(st: Static, q, k, v, do, rows, q_info, k_info, col0, full, slope):
    """``(P, dS, {name: dctx tile})`` of one ``[block_q, block_k]`` tile; ``rows``: ``(lse,
    base, ctx)``, the pass's lse, ``dlse - D`` and the row context, broadcast to the tile."""
    lse, dt, ctx = rows
    s, t = scores_and_log_weights(st, q, k, ctx, q_info, k_info, col0, full, slope)
    live = lse > -jnp.inf
    p = jnp.where(live, jnp.exp2((t - jnp.where(live, lse, 0.0)) * LOG2E), 0.0)
    if st.with_values:
        dt = dt + lax.dot_general(do, v, (((1,), (1,)), ((), ())), precision=precision(do),
                                  preferred_element_type=F32)
    ds, dctx = log_weight_vjp(st.normalizer, st.pass_idx, s, ctx, p * dt)
    return p, ds, dctx


def _rows(st: Static, r, index, shape):
    """``(lse, base, ctx)`` rows at ``index`` (refs ``row_lse``, ``row_base``, ``ctx_<name>``)
    broadcast to ``shape``."""
    get = lambda name: lax.broadcast_in_dim(r[name][index], shape, [0])  # noqa: E731
    return get("row_lse"), get("row_base"), {n: get(f"ctx_{n}") for n in st.ctx_names}


def _dq_kernel(st: Static, names, *refs):
    r = dict(zip(names, refs))
    i = st.n_q_tiles - 1 - pl.program_id(0)
    h = pl.program_id(1)
    q = r["q"][...]
    do = r["do"][...] if st.with_values else None
    rows = _rows(st, r, slice(None), (st.block_q, st.block_k))
    q_info = query_side(st, r, i * st.block_q, slice(None))
    slope = r["slopes"][h] if st.bias_fn is not None else None

    def step(s, carry):
        dq, dctx = carry
        entry = r["lists"][i, 1 + s]
        col0 = pl.multiple_of(lax.div(entry, 2) * st.block_k, st.block_k)
        cols = pl.ds(col0, st.block_k)
        k = r["k"][cols, :]
        v = r["v"][cols, :] if st.with_values else None
        _, ds, dc = _tile_grads(st, q, k, v, do, rows, q_info, key_side(st, r, cols), col0,
                                lax.rem(entry, 2) == 1, slope)
        dq = dq + jnp.dot(ds.astype(k.dtype), k, precision=precision(k),
                          preferred_element_type=F32)
        return dq, {n: dctx[n] + dc[n].sum(axis=1) for n in st.ctx_names}

    dq, dctx = lax.fori_loop(
        0, r["lists"][i, 0], step,
        (jnp.zeros(q.shape, F32), {n: jnp.zeros((st.block_q,), F32) for n in st.ctx_names}))
    r["dq"][...] = dq
    for n in st.ctx_names:
        r[f"dctx_{n}"][...] = dctx[n]


def _dkv_kernel(st: Static, names, *refs):
    r = dict(zip(names, refs))
    w, hk = pl.program_id(0), pl.program_id(1)
    j, start, stop = r["items"][w, 0], r["items"][w, 1], r["items"][w, 2]
    col0 = pl.multiple_of(j * st.block_k, st.block_k)
    keys = pl.ds(col0, st.block_k)
    k = r["k"][keys, :]
    v = r["v"][keys, :] if st.with_values else None
    k_info = key_side(st, r, keys)
    tn = (((0,), (0,)), ((), ()))  # a^T b

    def head(hg, carry):  # one query head of the GQA group
        slope = r["slopes"][hk * st.group + hg] if st.bias_fn is not None else None

        def step(s, carry):
            dk, dv = carry
            entry = r["lists_t"][j, 1 + s]
            row0 = pl.multiple_of(lax.div(entry, 2) * st.block_q, st.block_q)
            qrows = pl.ds(row0, st.block_q)
            q = r["q"][hg, qrows, :]
            do = r["do"][hg, qrows, :] if st.with_values else None
            p, ds, _ = _tile_grads(st, q, k, v, do,
                                   _rows(st, r, (hg, qrows), (st.block_q, st.block_k)),
                                   query_side(st, r, row0, qrows), k_info, col0,
                                   lax.rem(entry, 2) == 1, slope)
            dk = dk + lax.dot_general(ds.astype(q.dtype), q, tn, precision=precision(q),
                                      preferred_element_type=F32)
            if st.with_values:
                dv = dv + lax.dot_general(p.astype(do.dtype), do, tn, precision=precision(do),
                                          preferred_element_type=F32)
            return dk, dv

        return lax.fori_loop(start, stop, step, carry)

    dv0 = jnp.zeros(v.shape, F32) if st.with_values else None
    dk, dv = lax.fori_loop(0, st.group, head, (jnp.zeros(k.shape, F32), dv0))
    r["dk"][...] = dk
    if st.with_values:
        r["dv"][...] = dv


def flash_attention_bwd(q, k, v, ctx: dict, out, lse, dout, dlse, *, mask, normalizer,
                        pass_idx: int = 0, q_positions, k_positions, q_segment_ids=None,
                        kv_segment_ids=None, bias=None,
                        block_sizes: BlockSizes | tuple[int, int] | None = None,
                        num_warps: int | None = None, num_stages: int = 2, interpret=None):
    """Gradients of one ``triton_forward.flash_attention_pass``: ``(dq, dk, dv or None, dctx
    or None)``, float32, shaped as ``backward.flash_attention_bwd``'s (whose arguments these
    are, with q, k, v in bfloat16, float16 or float32 and ``block_sizes``:
    ``BlockSizes.of(block_sizes).backward``, default ``triton_forward.DEFAULT_BLOCKS``;
    ``num_warps`` / ``num_stages`` as for the forward)."""
    blocks = DEFAULT_BLOCKS if block_sizes is None else BlockSizes.of(block_sizes).backward
    setup = plan(q, k, v, ctx, blocks, num_warps, num_stages, interpret, OWNER, mask=mask,
                 normalizer=normalizer, pass_idx=pass_idx, q_positions=q_positions,
                 k_positions=k_positions, q_segment_ids=q_segment_ids,
                 kv_segment_ids=kv_segment_ids, bias=bias)
    st, (tq_p, tk_p), classes = setup.st, setup.padded, setup.classes
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    bq, bk, nq, group, with_values = st.block_q, st.block_k, st.n_q_tiles, st.group, \
        st.with_values
    base = jnp.zeros((b, hq, tq), F32) if dlse is None else dlse.astype(F32)
    if with_values:
        base = base - jnp.sum(dout.astype(F32) * out.astype(F32), axis=-1)
    row_arrays = {"row_lse": jnp.pad(lse.astype(F32), ((0, 0), (0, 0), (0, tq_p - tq)),
                                     constant_values=-jnp.inf),
                  "row_base": pad_axis(base, tq_p, 2),
                  **{f"ctx_{n}": pad_axis(jnp.asarray(ctx[n], F32), tq_p, 2) for n in ctx}}
    q_p, k_p = pad_axis(q, tq_p, 2), pad_axis(k, tk_p, 2)
    v_p = pad_axis(v, tk_p, 2) if with_values else None
    do = pad_axis(dout.astype(v.dtype), tq_p, 2) if with_values else None
    typed = (q, k, v)

    # dQ: grid (query tile, query head, batch), tiles in reverse as in the forward
    tile = lambda *tail: pl.BlockSpec(  # noqa: E731
        (None, None, bq, *tail), lambda i, h, z: (z, h, nq - 1 - i, *(0 for _ in tail)))
    kv_head = lambda x: pl.BlockSpec(  # noqa: E731
        (None, None, tk_p, x.shape[-1]), lambda i, h, z: (z, lax.div(h, group), 0, 0))
    ins = {"lists": (pack_lists(block_sparse.block_lists(classes)), None),
           "q": (q_p, tile(d)), "k": (k_p, kv_head(k_p))}
    if with_values:
        ins |= {"v": (v_p, kv_head(v_p)), "do": (do, tile(do.shape[-1]))}
    ins |= {n: (a, tile()) for n, a in row_arrays.items()}
    for f, name in enumerate(st.q_fields):
        ins[f"q_{name}"] = (setup.q_info[:, f], pl.BlockSpec((None, bq),
                                                             lambda i, h, z: (z, nq - 1 - i)))
    ins |= setup.key_inputs(lambda i, h, z: (z, 0))
    outs = {"dq": (varying_struct((b, hq, tq_p, d), F32, typed), tile(d))}
    outs |= {f"dctx_{n}": (varying_struct((b, hq, tq_p), F32, typed), tile()) for n in ctx}
    dq = call(_dq_kernel, st, (nq, hq, b), ins, outs, "block_sparse_flash_attention_dq_triton",
              setup.launch)

    # dK/dV: grid (work item, kv head, batch); q-side arrays per GQA group of query heads
    lists_t = block_sparse.block_lists(classes.T)
    items = column_items(lists_t)
    n_items = items.shape[0]
    group_of = lambda x: pl.BlockSpec(  # noqa: E731  [B, Hq, Tq, ...] -> one kv head's heads
        (None, group, *x.shape[2:]), lambda w, h, z: (z, h, *(0 for _ in x.shape[2:])))
    kv_whole = lambda x: pl.BlockSpec(  # noqa: E731
        (None, None, tk_p, x.shape[-1]), lambda w, h, z: (z, h, 0, 0))
    ins = {"items": (items, None), "lists_t": (pack_lists(lists_t), None),
           "q": (q_p, group_of(q_p)), "k": (k_p, kv_whole(k_p))}
    if with_values:
        ins |= {"v": (v_p, kv_whole(v_p)), "do": (do, group_of(do))}
    ins |= {n: (a, group_of(a)) for n, a in row_arrays.items()}
    for f, name in enumerate(st.q_fields):
        ins[f"q_{name}"] = (setup.q_info[:, f], pl.BlockSpec((None, tq_p),
                                                             lambda w, h, z: (z, 0)))
    ins |= setup.key_inputs(lambda w, h, z: (z, 0))
    part = lambda x: (  # noqa: E731  one item's partial sums
        varying_struct((b, hk, n_items * bk, x.shape[-1]), F32, typed),
        pl.BlockSpec((None, None, bk, x.shape[-1]), lambda w, h, z: (z, h, w, 0)))
    outs = {"dk": part(k_p)} | ({"dv": part(v_p)} if with_values else {})
    dkv = call(_dkv_kernel, st, (n_items, hk, b), ins, outs,
               "block_sparse_flash_attention_dkv_triton", setup.launch)

    shape = (b, hk, tk_p // bk, bk)
    return (dq["dq"][:, :, :tq], sum_items(dkv["dk"], items, shape)[:, :, :tk],
            sum_items(dkv["dv"], items, shape)[:, :, :tk] if with_values else None,
            {n: dq[f"dctx_{n}"][:, :, :tq] for n in ctx} if ctx else None)
