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
The ``custom_vjp`` takes the padded ``[B, T, H, D]`` arrays: the forward rule tiles them with
``BlockSizes.forward``, the backward rule with ``BlockSizes.backward``. Sequences are padded to
a length both tilings divide (``pallas_kernels.block_sizes.tilings``); padded keys are masked
out.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcattn.positions import alibi_bias
from lcattn.sharding import varying_like
from pallas_kernels import block_sparse
from pallas_kernels.block_sizes import BlockSizes, tilings
from pallas_kernels.block_sparse import pad_axis


class _Config(NamedTuple):
    mask: object
    normalizer: object
    pass_idx: int
    with_values: bool
    with_bias: bool
    with_segments: bool
    forward: tuple[int, int]  # (bq, bk) of the forward tiling
    backward: tuple[int, int]  # (bq, bk) of the backward tiling


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

        state = jax.lax.fori_loop(0, aux["kv_count"][i], step,
                                  varying_like(norm.init(rows, dv), qi, k, v, ctx_i, aux))
        return norm.finalize(state)

    return jax.lax.map(per_q_block, (jnp.arange(q.shape[0]), q, ctx))


def _backward(cfg: _Config, q, k, v, ctx, aux, out, lse, dout, dlse):
    """Blocked ``(dq, dk, dv, dctx)`` (float32) from the blocked residuals and cotangents."""
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

        init = varying_like((jnp.zeros(qi.shape, jnp.float32),
                              jax.tree.map(jnp.zeros_like, ctx_i)), qi, k, v, ctx_i, aux) + carry
        dq, dctx, dk, dv = jax.lax.fori_loop(0, aux["kv_count"][i], step, init)
        return (dk, dv), (dq, dctx)

    carry = varying_like((jnp.zeros(k.shape, jnp.float32),
                           jnp.zeros(v.shape, jnp.float32) if cfg.with_values else None),
                          q, k, v, ctx, aux, dout, dlse)
    dout_f = dout if cfg.with_values else jnp.zeros(lse.shape + (0,), jnp.float32)
    (dk, dv), (dq, dctx) = jax.lax.scan(
        per_q_block, carry, (jnp.arange(q.shape[0]), q, ctx, dout_f, lse, row_dot, dlse))
    return dq, dk, dv, dctx


# -- layouts: padded [B, T, H, ...] <-> blocked ---------------------------------------------
def _q_rows(x, bq, hk):
    """``[B, Tq_pad, Hq, ...]`` -> ``[nq, B, Hkv, G*bq, ...]`` (rows ordered group-major)."""
    b, t, hq, rest = x.shape[0], x.shape[1], x.shape[2], x.shape[3:]
    nq, g = t // bq, hq // hk
    x = x.reshape((b, nq, bq, hk, g) + rest)
    x = jnp.moveaxis(x, (1, 3, 4), (0, 2, 3))
    return x.reshape((nq, b, hk, g * bq) + rest)


def _q_unrows(x, hq):
    """``[nq, B, Hkv, G*bq, ...]`` -> ``[B, Tq_pad, Hq, ...]`` (inverse of ``_q_rows``)."""
    nq, b, hk, rows, rest = x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4:]
    g = hq // hk
    x = x.reshape((nq, b, hk, g, rows // g) + rest)
    return jnp.moveaxis(x, (0, 2, 3), (1, 3, 4)).reshape((b, nq * rows // g, hq) + rest)


def _k_blocks(x, bk):
    """``[B, Tk_pad]`` -> ``[nk, B, bk]``; ``[B, Tk_pad, H, D]`` -> ``[nk, B, H, bk, D]``."""
    x = jnp.asarray(x)
    x = x.reshape((x.shape[0], x.shape[1] // bk, bk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0) if x.ndim == 3 else jnp.moveaxis(x, (1, 3), (0, 2))


def _k_unblocks(x):
    """``[nk, B, H, bk, D]`` -> ``[B, Tk_pad, H, D]`` (inverse of ``_k_blocks``)."""
    nk, b, h, bk, d = x.shape
    return jnp.moveaxis(x, (0, 2), (1, 3)).reshape(b, nk * bk, h, d)


def _blocked(tiling, hk, q, k, v, ctx):
    """q, k, v ``[B, T, H, D]`` and ctx ``{name: [B, Tq, Hq]}`` in the blocked layout."""
    bq, bk = tiling
    return (_q_rows(q, bq, hk), _k_blocks(k, bk), None if v is None else _k_blocks(v, bk),
            {n: _q_rows(c[..., None], bq, hk) for n, c in ctx.items()})


# -- the custom_vjp over padded arrays -------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pass(cfg, q, k, v, ctx, aux_fwd, aux_bwd):
    """``(out [B, Tq_pad, Hq, Dv] or None, lse [B, Tq_pad, Hq])`` of padded q, k, v."""
    return _pass_fwd(cfg, q, k, v, ctx, aux_fwd, aux_bwd)[0]


def _pass_fwd(cfg, q, k, v, ctx, aux_fwd, aux_bwd):
    hq, hk = q.shape[2], k.shape[2]
    out, lse = _forward(cfg, *_blocked(cfg.forward, hk, q, k, v, ctx), aux_fwd)
    out = None if out is None else _q_unrows(out, hq)
    lse = _q_unrows(lse, hq)
    return (out, lse), (q, k, v, ctx, aux_bwd, out, lse)


def _pass_bwd(cfg, res, cts):
    q, k, v, ctx, aux, out, lse = res
    dout, dlse = cts
    hq, hk = q.shape[2], k.shape[2]
    bq = cfg.backward[0]
    rows = lambda x: None if x is None else _q_rows(x, bq, hk)  # noqa: E731
    dq, dk, dv, dctx = _backward(cfg, *_blocked(cfg.backward, hk, q, k, v, ctx), aux, rows(out),
                                 rows(lse), rows(dout), rows(dlse))
    dv = _k_unblocks(dv).astype(v.dtype) if cfg.with_values else None
    dctx = {n: _q_unrows(c, hq)[..., 0] for n, c in dctx.items()}
    return (_q_unrows(dq, hq).astype(q.dtype), _k_unblocks(dk).astype(k.dtype), dv, dctx,
            None, None)


_pass.defvjp(_pass_fwd, _pass_bwd)


def _aux(mask, tiling, tk, g, qp, kp, qs, ks, bias):
    """Block lists and blocked positions / segments / ALiBi inputs of one tiling."""
    bq, bk = tiling
    b, lk = kp.shape
    lists = block_sparse.block_lists(block_sparse.tile_classes(mask, qp, kp, bq, bk, qs, ks))

    def q_rows_pos(p):  # [B, Tq_pad] -> [nq, B, G*bq]
        p = jnp.asarray(p)
        return jnp.tile(jnp.moveaxis(p.reshape(b, p.shape[1] // bq, bq), 1, 0), (1, 1, g))

    aux = {"kv_index": jnp.asarray(lists.kv_index), "kv_count": jnp.asarray(lists.kv_count),
           "q_pos": q_rows_pos(qp), "k_pos": _k_blocks(kp, bk),
           "k_valid": jnp.arange(lk).reshape(lk // bk, bk) < tk}
    if qs is not None:
        aux["q_seg"], aux["k_seg"] = q_rows_pos(qs), _k_blocks(ks, bk)
    if bias is not None:
        qe, ke, slopes = bias
        aux["q_bias"], aux["k_bias"] = q_rows_pos(qe), _k_blocks(ke, bk)
        aux["slopes"] = jnp.repeat(jnp.asarray(slopes, jnp.float32).reshape(-1, g), bq, axis=1)
    return aux


def pass_fn(block_sizes: BlockSizes | None = None, interpret=None):
    """A ``streaming_attend`` pass tiled by ``BlockSizes.of(block_sizes)`` (default 512 x 512).

    ``interpret`` is accepted so every backend factory has the same signature, and ignored:
    this backend is plain XLA and runs natively on every platform.
    """
    del interpret
    blocks = BlockSizes.of(block_sizes)

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        tq, hq = q.shape[1], q.shape[2]
        tk = k.shape[1]
        g = hq // k.shape[2]
        (lq, lk), fwd, bwd = tilings(blocks, tq, tk)
        qp, kp = pad_axis(q_pos, lq, 1, edge=True), pad_axis(k_pos, lk, 1, edge=True)
        qs = None if q_seg is None else pad_axis(q_seg, lq, 1, edge=True)
        ks = None if kv_seg is None else pad_axis(kv_seg, lk, 1, edge=True)
        if bias is not None:
            qe, ke, slopes = bias
            bias = (pad_axis(qe, lq, 1, edge=True), pad_axis(ke, lk, 1, edge=True), slopes)
        aux_fwd = _aux(mask, fwd, tk, g, qp, kp, qs, ks, bias)
        aux_bwd = aux_fwd if bwd == fwd else _aux(mask, bwd, tk, g, qp, kp, qs, ks, bias)
        cfg = _Config(mask, normalizer, pass_idx, v is not None, bias is not None,
                      qs is not None, fwd, bwd)
        out, lse = _pass(cfg, pad_axis(q, lq, 1), pad_axis(k, lk, 1),
                         None if v is None else pad_axis(v, lk, 1),
                         {n: pad_axis(c, lq, 1) for n, c in ctx.items()}, aux_fwd, aux_bwd)
        return (None if out is None else out[:, :tq]), lse[:, :tq]

    return run
