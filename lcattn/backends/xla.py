"""The ``xla`` backend: a blockwise online scan that visits only non-empty tiles.

One *pass* (see ``lcattn.attention.streaming_attend``) computes, for each query row,
``out_i = sum_j exp(t_ij - lse_i) v_j`` and ``lse_i = log sum_j exp(t_ij)`` where
``t = normalizer.log_weight(q k^T + bias)`` on visible pairs. Layout inside: q blocks of
``block_q`` rows with the GQA group folded into rows (``[nq, B, Hkv, G*bq, D]``), K/V blocks
``[nk, B, Hkv, bk, D]`` (never repeated per query head). For q block ``i`` a ``fori_loop`` runs
over ``kv_index[i, :kv_count[i]]`` from ``pallas_kernels.block_sparse``, so a Λ-mask costs
O(window + sinks) per query and memory is O(T * block).

The backward pass is a ``custom_vjp`` in the FlashAttention style: it recomputes each visited
tile from the saved ``lse`` and forms ``ds = dt/ds * P * (dP - D + dlse)`` (``D = rowsum(dO * O)``),
taking ``dt/ds`` (and the gradient into the row context) with ``jax.vjp`` of the normalizer's
``log_weight``, so every normalizer gets an exact gradient without its own backward code.
Sequences that are not a multiple of the block are padded; padded keys are masked out.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lcattn.positions import alibi_bias
from pallas_kernels import block_sparse
from pallas_kernels.block_sparse import pad_axis

DEFAULT_BLOCKS = (512, 512)


class _Config(NamedTuple):
    mask: object
    normalizer: object
    pass_idx: int
    with_values: bool
    with_bias: bool
    with_segments: bool


def _swap(x):
    return jnp.swapaxes(x, -1, -2)


def _tile(cfg: _Config, aux, i, j, qi, kj):
    """Scores ``[B, Hkv, R, bk]`` (float32) and visibility of q block ``i`` x kv block ``j``."""
    s = jnp.matmul(qi, _swap(kj), preferred_element_type=jnp.float32)
    if cfg.with_bias:
        s = s + alibi_bias(aux["q_bias"][i][:, None, :, None], aux["k_bias"][j][:, None, None, :],
                           aux["slopes"][None, :, :, None])
    vis = cfg.mask(aux["q_pos"][i][:, None, :, None], aux["k_pos"][j][:, None, None, :])
    vis = vis & aux["k_valid"][j][None, None, None, :]
    if cfg.with_segments:
        vis = vis & (aux["q_seg"][i][:, None, :, None] == aux["k_seg"][j][:, None, None, :])
    return s, vis


def _forward(cfg: _Config, q, k, v, ctx, aux):
    norm = cfg.normalizer
    rows = q.shape[1:4]
    dv = v.shape[-1] if cfg.with_values else None

    def per_q_block(xs):
        i, qi, ctx_i = xs

        def step(jj, state):
            j = aux["kv_index"][i, jj]
            s, vis = _tile(cfg, aux, i, j, qi, k[j])
            t = jnp.where(vis, norm.log_weight(s, ctx_i, cfg.pass_idx), -jnp.inf)
            return norm.update(state, t, v[j] if cfg.with_values else None)

        state = jax.lax.fori_loop(0, aux["kv_count"][i], step, norm.init(rows, dv))
        return norm.finalize(state)

    return jax.lax.map(per_q_block, (jnp.arange(q.shape[0]), q, ctx))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pass(cfg, q, k, v, ctx, aux):
    return _forward(cfg, q, k, v, ctx, aux)


def _pass_fwd(cfg, q, k, v, ctx, aux):
    out, lse = _forward(cfg, q, k, v, ctx, aux)
    return (out, lse), (q, k, v, ctx, aux, out, lse)


def _pass_bwd(cfg, res, cts):
    q, k, v, ctx, aux, out, lse = res
    dout, dlse = cts
    norm = cfg.normalizer
    if cfg.with_values:
        row_dot = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)
    else:
        row_dot = jnp.zeros_like(lse)

    def per_q_block(carry, xs):
        i, qi, ctx_i, do_i, lse_i, rd_i, dl_i = xs
        live = jnp.isfinite(lse_i)[..., None]
        lse_i = jnp.where(live, lse_i[..., None], 0.0)
        base = (dl_i - rd_i)[..., None]

        def step(jj, c):
            dq, dctx, dk, dv = c
            j = aux["kv_index"][i, jj]
            kj = k[j]
            s, vis = _tile(cfg, aux, i, j, qi, kj)
            t, vjp = jax.vjp(lambda s_, c_: norm.log_weight(s_, c_, cfg.pass_idx), s, ctx_i)
            p = jnp.where(vis & live, jnp.exp(t - lse_i), 0.0)
            term = base
            if cfg.with_values:
                term = term + jnp.matmul(do_i, _swap(v[j]), preferred_element_type=jnp.float32)
                dv = dv.at[j].add(jnp.matmul(_swap(p), do_i.astype(jnp.float32)))
            ds, dc = vjp(p * term)
            dq = dq + jnp.matmul(ds, kj.astype(jnp.float32))
            dk = dk.at[j].add(jnp.matmul(_swap(ds), qi.astype(jnp.float32)))
            return dq, jax.tree.map(jnp.add, dctx, dc), dk, dv

        init = (jnp.zeros(qi.shape, jnp.float32), jax.tree.map(jnp.zeros_like, ctx_i)) + carry
        dq, dctx, dk, dv = jax.lax.fori_loop(0, aux["kv_count"][i], step, init)
        return (dk, dv), (dq, dctx)

    carry = (jnp.zeros(k.shape, jnp.float32),
             jnp.zeros(v.shape, jnp.float32) if cfg.with_values else None)
    dout_f = dout if cfg.with_values else jnp.zeros(lse.shape + (0,), jnp.float32)
    (dk, dv), (dq, dctx) = jax.lax.scan(
        per_q_block, carry, (jnp.arange(q.shape[0]), q, ctx, dout_f, lse, row_dot, dlse))
    dv = dv.astype(v.dtype) if cfg.with_values else None
    return dq.astype(q.dtype), dk.astype(k.dtype), dv, dctx, None


_pass.defvjp(_pass_fwd, _pass_bwd)


def _q_rows(x, nq, bq, hk, g):
    """``[B, Tq_pad, Hq, ...]`` -> ``[nq, B, Hkv, G*bq, ...]`` (rows ordered group-major)."""
    b, rest = x.shape[0], x.shape[3:]
    x = x.reshape((b, nq, bq, hk, g) + rest)
    x = jnp.moveaxis(x, (1, 3, 4), (0, 2, 3))
    return x.reshape((nq, b, hk, g * bq) + rest)


def pass_fn(block_sizes=None):
    """A ``streaming_attend`` pass using blocks ``(block_q, block_k)`` (default 512, 512)."""
    block_q, block_k = block_sizes or DEFAULT_BLOCKS
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"`block_sizes`: {name} must be an integer >= 1, got {b!r}")

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        b, tq, hq, d = q.shape
        tk, hk = k.shape[1], k.shape[2]
        g = hq // hk
        bq, bk = min(block_q, tq), min(block_k, tk)
        nq, nk = -(-tq // bq), -(-tk // bk)
        tqp, tkp = nq * bq, nk * bk
        qp, kp = pad_axis(q_pos, tqp, 1, edge=True), pad_axis(k_pos, tkp, 1, edge=True)
        qs = None if q_seg is None else pad_axis(q_seg, tqp, 1, edge=True)
        ks = None if kv_seg is None else pad_axis(kv_seg, tkp, 1, edge=True)
        lists = block_sparse.block_lists(
            block_sparse.tile_classes(mask, qp, kp, bq, bk, qs, ks))

        def q_rows_pos(p):  # [B, Tq_pad] -> [nq, B, G*bq]
            return jnp.tile(jnp.moveaxis(jnp.asarray(p).reshape(b, nq, bq), 1, 0), (1, 1, g))

        def k_blocks(x):  # [B, Tk_pad, ...] -> [nk, B, ..., bk, ...]
            x = jnp.asarray(x)
            x = x.reshape((b, nk, bk) + x.shape[2:])
            return jnp.moveaxis(x, 1, 0) if x.ndim == 3 else jnp.moveaxis(x, (1, 3), (0, 2))

        aux = {"kv_index": jnp.asarray(lists.kv_index), "kv_count": jnp.asarray(lists.kv_count),
               "q_pos": q_rows_pos(qp), "k_pos": k_blocks(kp),
               "k_valid": jnp.arange(tkp).reshape(nk, bk) < tk}
        if qs is not None:
            aux["q_seg"], aux["k_seg"] = q_rows_pos(qs), k_blocks(ks)
        if bias is not None:
            qe, ke, slopes = bias
            aux["q_bias"] = q_rows_pos(pad_axis(qe, tqp, 1, edge=True))
            aux["k_bias"] = k_blocks(pad_axis(ke, tkp, 1, edge=True))
            aux["slopes"] = jnp.repeat(jnp.asarray(slopes, jnp.float32).reshape(hk, g), bq, axis=1)
        qb = _q_rows(pad_axis(q, tqp, 1), nq, bq, hk, g)
        kb, vb = k_blocks(pad_axis(k, tkp, 1)), None
        if v is not None:
            vb = k_blocks(pad_axis(v, tkp, 1))
        ctxb = {n: _q_rows(pad_axis(c, tqp, 1)[..., None], nq, bq, hk, g)
                for n, c in ctx.items()}
        cfg = _Config(mask, normalizer, pass_idx, v is not None, bias is not None, qs is not None)
        out, lse = _pass(cfg, qb, kb, vb, ctxb, aux)

        def unrows(x):  # [nq, B, Hkv, G*bq, ...] -> [B, Tq, Hq, ...]
            rest = x.shape[4:]
            x = x.reshape((nq, b, hk, g, bq) + rest)
            x = jnp.moveaxis(x, (0, 2, 3), (1, 3, 4)).reshape((b, tqp, hq) + rest)
            return x[:, :tq]

        return (None if out is None else unrows(out)), unrows(lse)

    return run
