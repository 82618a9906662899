r"""A Pallas chunk-scan kernel for the Mamba-2 SSD forward pass (GPU-style, one program per
(batch, head), the state carried through a loop over chunks).

Per head (Dao & Gu, 2024, "Transformers are SSMs", §6), with ``Q``-token chunks, the state
``S [N, P]`` entering chunk ``c``, ``cum`` the cumulative log-decay inside the chunk and
``u = κ x`` the (already scaled) input::

    y_i    = Σ_{j <= i, same doc} C_iᵀB_j e^{cum_i - cum_j} u_j
             + [no start <= i] e^{cum_i} C_iᵀ S
    S_next = [no start in c] e^{cum_end} S
             + Σ_{j after the chunk's last start} B_j (e^{cum_end - cum_j} u_j)ᵀ

A program loads one chunk at a time (``Q × P`` of ``u``, ``Q × N`` of ``B`` and ``C``, ``Q`` log
decays and start flags), forms the ``Q × Q`` dual-form block and the read-out of ``S`` with
three matmuls, and updates ``S`` (``N × P``, float32) with a fourth: the state never leaves the
program. Cumulative sums are matmuls with a triangular ones matrix, and document masks come
from in-chunk start counts (two tokens of a chunk share a document iff their counts agree).

This module knows nothing of ``lcattn``; ``lcattn.ssm.ssd(..., impl="pallas")`` calls it.
Forward only: ``lcattn`` differentiates it through the chunked XLA form. Tested on CPU in
interpret mode; it has not been compiled or timed on a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_F32 = jnp.float32


def _kernel(u_ref, la_ref, st_ref, b_ref, c_ref, h0_ref, y_ref, h_ref, *, q: int, nc: int):
    """Refs (one program = one batch row and one head): ``u [L, P]``, ``la, st [L, 1]``,
    ``b, c [L, N]``, ``h0 [N, P]``; outputs ``y [L, P]``, ``h [N, P]`` (``L = nc·q``)."""
    row = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    lower = (row >= col).astype(_F32)                    # lower[i, j] = [j <= i]
    last = (jax.lax.broadcasted_iota(jnp.int32, (1, q), 1) == q - 1).astype(_F32)

    def chunk(ci, state):
        rows = pl.ds(ci * q, q)
        u, b, c = u_ref[rows, :], b_ref[rows, :], c_ref[rows, :]
        cum = jnp.dot(lower, la_ref[rows, :], preferred_element_type=_F32)      # [Q, 1]
        count = jnp.dot(lower, st_ref[rows, :], preferred_element_type=_F32)    # [Q, 1]
        cum_end = jnp.dot(last, cum, preferred_element_type=_F32)              # [1, 1]
        count_end = jnp.dot(last, count, preferred_element_type=_F32)
        same = (count == count.T) & (row >= col)
        decay = jnp.where(same, jnp.exp(jnp.minimum(cum - cum.T, 0.0)), 0.0)    # [Q, Q]
        scores = jnp.dot(c, b.T, preferred_element_type=_F32) * decay
        from_start = jnp.where(count == 0, jnp.exp(cum), 0.0)                  # [Q, 1]
        y = jnp.dot(scores, u, preferred_element_type=_F32) \
            + from_start * jnp.dot(c, state, preferred_element_type=_F32)
        y_ref[rows, :] = y.astype(y_ref.dtype)
        to_end = jnp.where(count == count_end, jnp.exp(jnp.minimum(cum_end - cum, 0.0)), 0.0)
        gate = jnp.where(count_end == 0, jnp.exp(cum_end), 0.0)                # [1, 1]
        return gate * state + jnp.dot(b.T, to_end * u, preferred_element_type=_F32)

    h_ref[...] = jax.lax.fori_loop(0, nc, chunk, h0_ref[...].astype(_F32))


def ssd_chunk_scan(u, log_decay, b, c, *, starts=None, initial_state=None, chunk_size=64,
                   interpret=None):
    """The SSD forward pass as one Pallas kernel.

    Args:
      u: ``[Z, T, H, P]`` the scaled inputs ``κ_t x_t``.
      log_decay: ``[Z, T, H]`` ``log α_t`` (<= 0).
      b, c: ``[Z, T, G, N]`` with ``H % G == 0`` (head ``h`` reads group ``h // (H // G)``).
      starts: None or ``bool [Z, T]``, True where a packed document starts (the state restarts
        there; position 0 True drops ``initial_state``).
      initial_state: None (zeros) or ``[Z, H, N, P]``.
      chunk_size: ``Q``; ``T`` need not be a multiple (front-padded with tokens that change
        nothing).
      interpret: None = interpret mode unless running on a GPU.

    Returns ``(y [Z, T, H, P] float32, final state [Z, H, N, P] float32)``.
    """
    z, t, h, p = u.shape
    g, n = b.shape[2:]
    if log_decay.shape != (z, t, h) or b.shape[:2] != (z, t) or c.shape != b.shape \
            or h % g:
        raise ValueError(f"ssd_chunk_scan: want u [Z, T, H, P], log_decay [Z, T, H], b and c "
                         f"[Z, T, G, N] with H % G == 0; got {u.shape}, {log_decay.shape}, "
                         f"{b.shape}, {c.shape}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd_chunk_scan: `chunk_size` must be an integer >= 1, got "
                         f"{chunk_size!r}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    starts = jnp.zeros((z, t), _F32) if starts is None else starts.astype(_F32)
    h0 = jnp.zeros((z, h, n, p), _F32) if initial_state is None else initial_state
    pad = -t % chunk_size
    length = t + pad

    def heads_major(a):   # [Z, T, X, ...] -> [Z, X, L, ...], front-padded with zeros
        a = jnp.pad(a.astype(_F32), [(0, 0), (pad, 0)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a, 2, 1)

    k = h // g

    def per_head(width):
        return pl.BlockSpec((None, None, length, width), lambda zi, hi: (zi, hi, 0, 0))

    def per_group(width):
        return pl.BlockSpec((None, None, length, width), lambda zi, hi: (zi, hi // k, 0, 0))

    per_row = pl.BlockSpec((None, length, 1), lambda zi, hi: (zi, 0, 0))
    state = pl.BlockSpec((None, None, n, p), lambda zi, hi: (zi, hi, 0, 0))
    y, h_last = pl.pallas_call(
        functools.partial(_kernel, q=chunk_size, nc=length // chunk_size),
        grid=(z, h),
        in_specs=[per_head(p), per_head(1), per_row, per_group(n), per_group(n), state],
        out_specs=[per_head(p), state],
        out_shape=[jax.ShapeDtypeStruct((z, h, length, p), _F32),
                   jax.ShapeDtypeStruct((z, h, n, p), _F32)],
        interpret=interpret,
        # Triton, not Mosaic GPU: Mosaic copies every whole [L, width] block into shared
        # memory, Triton keeps the refs in global memory and loads one chunk per step
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        name="ssd_chunk_scan",
    )(heads_major(u), heads_major(log_decay[..., None]),
      jnp.pad(starts, [(0, 0), (pad, 0)])[..., None], heads_major(b), heads_major(c), h0)
    return jnp.moveaxis(y, 1, 2)[:, pad:], h_last
