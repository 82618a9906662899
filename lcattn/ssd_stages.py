r"""The three stages of the chunked SSD algorithm, each with a hand-written gradient.

``lcattn.ssm.ssd_chunked`` splits a sequence into ``nc`` chunks of ``Q`` tokens and computes
(Dao & Gu, 2024, "Transformers are SSMs", §6, per head, ``c`` the chunk of token ``i``)::

    y_i = Σ_{j <= i in c} C_iᵀB_j e^{cum_i - cum_j} x_j     intra_chunk   (the dual form)
    S_{c+1} = g_c S_c + Σ_{j in c} B_j (e^{cum_end - cum_j} x_j)ᵀ         chunk_states
    y_i += e^{cum_i} C_iᵀ S_c                                readout

with ``cum`` the cumulative log-decay inside each chunk (``cum_end`` its last entry) and
``g_c = e^{cum_end}``. ``x`` here is the already scaled input ``κ x``. Packed documents enter
as masks built from ``counts``: the number of document starts at or before each token inside
its chunk (a float count, from the same triangular matmul as ``cum``). Two tokens of a chunk
are in the same document iff their counts are equal; terms that cross a start are zero.

Why hand-written gradients: differentiating these contractions automatically makes XLA:CPU
transpose the ``[.., nc, Q, P]`` operands between almost every matmul (and run the chunk
recurrence's transpose as a second scan with more transposes), which made the backward ~5×
the forward. Here every matmul of the backward is a batched matmul over the same
heads-major layout as the forward, and the forward saves what the backward needs.

Layouts (``Z`` batch, ``G`` groups, ``K`` heads per group): ``x [Z, G, K, nc, Q, P]``,
``cum [Z, G, K, nc, Q]``, ``b, c [Z, G, nc, Q, N]``, ``counts [Z, 1, 1, nc, Q]``,
states ``[Z, G, K, nc, N, P]`` (``h0``, ``h_last``: ``[Z, G, K, N, P]``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _sum_heads(a):
    """``[Z, G, K, ...] -> [Z, G, ...]``, one add per head (XLA:CPU reduces a non-minor axis
    an order of magnitude slower than it adds slices)."""
    return functools.reduce(jnp.add, [a[:, :, i] for i in range(a.shape[2])])


def _dot(spec, a, b):
    """A contraction such as ``Σ_j a_ij b_ij``, as an einsum: XLA:CPU runs ``sum(a * b)``
    over the minor axis about ten times slower."""
    return jnp.einsum(spec, a, b)


def _per_head(a, k):
    """``[Z, G, ...] -> [Z, G, k, ...]``."""
    return jnp.broadcast_to(a[:, :, None], a.shape[:2] + (k,) + a.shape[2:])


# -- 1. inside each chunk --------------------------------------------------------------------
@jax.custom_vjp
def intra_chunk(x, cum, b, c, counts):
    """``y_i = Σ_{j <= i, same chunk and document} C_iᵀB_j exp(cum_i - cum_j) x_j``:
    ``[Z, G, K, nc, Q, P]``."""
    return _intra_fwd(x, cum, b, c, counts)[0]


def _intra_fwd(x, cum, b, c, counts):
    q = x.shape[-2]
    visible = (counts[..., :, None] == counts[..., None, :]) & jnp.tril(jnp.ones((q, q), bool))
    # cum_i - cum_j <= 0 for j <= i; clamped above j > i, where the mask zeroes it anyway
    decay = jnp.exp(jnp.minimum(cum[..., :, None] - cum[..., None, :], 0.0)) * visible
    w = _per_head(jnp.einsum("zgcin,zgcjn->zgcij", c, b), x.shape[2]) * decay
    y = jnp.einsum("zgkcij,zgkcjp->zgkcip", w, x)
    return y, (x, b, c, decay, w)


def _intra_bwd(res, dy):
    x, b, c, decay, w = res
    dw = jnp.einsum("zgkcip,zgkcjp->zgkcij", dy, x)
    dx = jnp.einsum("zgkcij,zgkcip->zgkcjp", w, dy)
    # d/d(cum_i - cum_j) = dw ⊙ w, summed over j (for cum_i) and over i (for cum_j)
    dcum = _dot("...ij,...ij->...i", dw, w) - _dot("...ij,...ij->...j", dw, w)
    dcb = _sum_heads(dw * decay)
    dc = jnp.einsum("zgcij,zgcjn->zgcin", dcb, b)
    db = jnp.einsum("zgcij,zgcin->zgcjn", dcb, c)
    return dx, dcum, db, dc, None


intra_chunk.defvjp(_intra_fwd, _intra_bwd)


# -- 2. the states entering each chunk --------------------------------------------------------
@jax.custom_vjp
def chunk_states(x, cum, b, counts, h0):
    """``(entering [Z, G, K, nc, N, P], h_last [Z, G, K, N, P])``: ``S_0 = h0``,
    ``S_{c+1} = g_c S_c + Σ_j B_j (exp(cum_end - cum_j) x_j)ᵀ``; ``g_c = 0`` and the
    written terms before a start are dropped when a document counts inside chunk ``c``."""
    return _states_fwd(x, cum, b, counts, h0)[0]


def _states_fwd(x, cum, b, counts, h0):
    nc, k = x.shape[3], x.shape[2]
    to_end = jnp.exp(cum[..., -1:] - cum) * (counts == counts[..., -1:])  # [Z, G, K, nc, Q]
    written = to_end[..., None] * x
    local = jnp.einsum("zgkcjn,zgkcjp->zgkcnp", _per_head(b, k), written)
    gate = jnp.exp(cum[..., -1]) * (counts[..., -1] == 0)                # [Z, G, K, nc]

    def body(i, carry):
        h, entering = carry
        entering = jax.lax.dynamic_update_index_in_dim(entering, h, i, axis=3)
        h = gate[..., i, None, None] * h + jax.lax.dynamic_index_in_dim(local, i, 3, False)
        return h, entering

    h_last, entering = jax.lax.fori_loop(0, nc, body, (h0, jnp.zeros_like(local)))
    return (entering, h_last), (x, b, to_end, written, gate, entering)


def _states_bwd(res, cotangents):
    x, b, to_end, written, gate, entering = res
    d_entering, d_last = cotangents
    nc, k = x.shape[3], x.shape[2]

    def body(r, carry):   # walks the chunks backwards: grad is dL/dS_{c+1}
        grad, d_local = carry
        i = nc - 1 - r
        d_local = jax.lax.dynamic_update_index_in_dim(d_local, grad, i, axis=3)
        grad = gate[..., i, None, None] * grad \
            + jax.lax.dynamic_index_in_dim(d_entering, i, 3, False)
        return grad, d_local

    dh0, d_local = jax.lax.fori_loop(0, nc, body, (d_last, jnp.zeros_like(d_entering)))
    d_gate = _dot("...np,...np->...", d_local, entering)                  # [Z, G, K, nc]
    d_written = jnp.einsum("zgkcjn,zgkcnp->zgkcjp", _per_head(b, k), d_local)
    db = _sum_heads(jnp.einsum("zgkcjp,zgkcnp->zgkcjn", written, d_local))
    dx = to_end[..., None] * d_written
    d_end = _dot("...jp,...jp->...j", d_written, x) * to_end           # d/d(cum_end - cum_j)
    dcum = -d_end
    dcum = dcum.at[..., -1].add(jnp.sum(d_end, -1) + d_gate * gate)
    return dx, dcum, db, None, dh0


chunk_states.defvjp(_states_fwd, _states_bwd)


# -- 3. the entering state read out inside each chunk -----------------------------------------
@jax.custom_vjp
def readout(c, entering, cum, counts):
    """``y_i = exp(cum_i) C_iᵀ S_c`` for tokens before the chunk's first document start (0
    after it): ``[Z, G, K, nc, Q, P]``."""
    return _readout_fwd(c, entering, cum, counts)[0]


def _readout_fwd(c, entering, cum, counts):
    from_start = jnp.exp(cum) * (counts == 0)
    r = jnp.einsum("zgkcin,zgkcnp->zgkcip", _per_head(c, entering.shape[2]), entering)
    return from_start[..., None] * r, (c, entering, from_start, r)


def _readout_bwd(res, dy):
    c, entering, from_start, r = res
    dr = from_start[..., None] * dy
    d_entering = jnp.einsum("zgkcin,zgkcip->zgkcnp", _per_head(c, entering.shape[2]), dr)
    dc = _sum_heads(jnp.einsum("zgkcip,zgkcnp->zgkcin", dr, entering))
    dcum = _dot("...ip,...ip->...i", dy, r) * from_start
    return dc, d_entering, dcum, None


readout.defvjp(_readout_fwd, _readout_bwd)
