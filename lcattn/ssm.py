r"""Mamba-2 state-space duality (SSD) as pure functions, with state-collapse mitigations.

Per head ``h`` (Dao & Gu, 2024, "Transformers are SSMs", §3 and §6) a scalar decay
``A_h < 0``, a step ``Δ_t > 0``, an input ``x_t ∈ R^P`` and ``B_t, C_t ∈ R^N`` (shared by the
heads of a group, as GQA shares keys) drive a state ``h_t ∈ R^{N×P}``::

    α_t = exp(Δ_t A)                    decay, 0 < α_t <= 1
    h_t = α_t h_{t-1} + Δ_t B_t x_tᵀ    state update
    y_t = C_tᵀ h_t                      readout (the layer adds the skip D x_t)

Unrolled, ``y = M x`` with the semiseparable ``M_ij = C_iᵀ B_j Δ_j ∏_{k=j+1..i} α_k`` for
``j <= i``: the quadratic "attention" dual of the linear recurrence.

Layouts: ``x [B, T, H, P]``, ``dt [B, T, H]`` (``Δ``, already positive), ``A [H]`` (negative),
``B, C [B, T, G, N]`` with ``H % G == 0`` (head ``h`` reads group ``h // (H // G)``).

Implementations, all returning ``(y [B, T, H, P], SSMState)``:

* ``ssd_sequential``: ``lax.scan`` of the one-token update (the reference; every option);
* ``ssd_chunked``: the chunked SSD algorithm (paper §6) in chunks of ``Q`` tokens: the dual form
  inside each chunk, one state per chunk, a scan over the ``T / Q`` chunk states, and the
  entering state read out inside each chunk; ``O(T·Q·(N + P) + T·N·P)`` work. The three
  stages have hand-written gradients (``lcattn.ssd_stages``), and long sequences run as a
  scan over blocks of chunks, rematerialized in the backward pass;
* ``ssd_pallas``: the chunked forward as one Pallas kernel (``pallas_kernels.ssd_scan``;
  gradients recompute ``ssd_chunked``; no ``window`` / ``state_clip``);
* ``ssd_step``: one token (decoding); ``ssd``: the switch between them.

Documents: ``starts [B, T]`` (from ``segment_starts(segment_ids)``) marks the first token of
each packed document; there ``α_t`` is replaced by 0 (the state restarts), so ``M_ij = 0``
across documents. ``starts[:, 0]`` resets the incoming ``state``.

State-collapse mitigations (Chen et al., 2024, "Stuffed Mamba") are ``SSMOptions``. With them
the update is ``h_t = α_t^λ h_{t-1} + u_t`` (``λ = decay_scale``) with the insertion
``u_t = κ_t B_t x_tᵀ``, ``κ_t = γ Δ_t min(1, c / (γ Δ_t ‖B_t‖ ‖x_t‖))`` (``γ = input_scale``,
``c = input_clip``, so ``‖u_t‖_F <= c``); ``state_clip`` rescales ``h_t`` to norm
``<= state_clip`` after each update; ``window = r`` keeps only the last ``r`` insertions, by
state difference::

    h_t^(r) = h_t - (∏_{k=t-r+1..t} α_k) h_{t-r}
            = α_t h_{t-1}^(r) + u_t - (∏_{k=t-r+1..t} α_k) u_{t-r}

(the second line is the recurrence, with a ring buffer of the last ``r`` insertions; in the
chunked form it is the band ``i - j < r`` of ``M``).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcattn import checks, ssd_stages
from pallas_kernels import ssd_scan

IMPLS = ("auto", "chunked", "sequential", "pallas")
_TINY = 1e-30  # floor under squared norms so sqrt has a finite gradient at 0


@dataclasses.dataclass(frozen=True)
class SSMOptions:
    """Training-free state-collapse mitigations (see the module docstring); defaults are off.

    Attributes:
      decay_scale: ``λ``: ``α_t -> α_t^λ`` (``λ > 1`` forgets faster).
      input_scale: ``γ``: insertions ``u_t`` scaled by ``γ`` (``γ < 1`` remembers less).
      input_clip: None, or ``c``: each insertion's Frobenius norm clipped to ``c``.
      state_clip: None, or ``c``: after each update ``h_t`` is rescaled to norm ``<= c`` per
        head (nonlinear: ``ssd_sequential`` / ``ssd_step`` only).
      window: None, or ``r >= 1``: only the last ``r`` tokens stay in the state (sliding window
        by state difference). Not combinable with ``state_clip``; ``ssd_chunked`` needs it to
        be a multiple of its ``chunk_size``.
    """

    decay_scale: float = 1.0
    input_scale: float = 1.0
    input_clip: float | None = None
    state_clip: float | None = None
    window: int | None = None

    def __post_init__(self):
        checks.positive("SSMOptions", "decay_scale", self.decay_scale)
        checks.positive("SSMOptions", "input_scale", self.input_scale)
        checks.positive("SSMOptions", "input_clip", self.input_clip, allow_none=True)
        checks.positive("SSMOptions", "state_clip", self.state_clip, allow_none=True)
        checks.integer("SSMOptions", "window", self.window, allow_none=True)
        if self.window is not None and self.state_clip is not None:
            raise ValueError("SSMOptions: `window` and `state_clip` cannot be combined (the "
                             "window subtracts old insertions, which assumes a linear state); "
                             "set one of them to None")

    @property
    def ring_size(self) -> int:
        """Insertions the state must remember: ``window`` or 0."""
        return int(self.window or 0)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("h", "ring_b", "ring_x", "ring_la"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class SSMState:
    """The recurrent state (float32; a pytree), ``R = options.ring_size``.

    Attributes:
      h: ``[B, H, N, P]`` the state ``h_t`` (windowed: ``h_t^(r)``).
      ring_b: ``[B, R, G, N]`` the last ``R`` tokens' ``B_k``, oldest first.
      ring_x: ``[B, R, H, P]`` their ``κ_k x_k`` (so ``u_k = ring_b ⊗ ring_x``).
      ring_la: ``[B, R, H]`` their ``log α_k`` (after ``decay_scale``).

    Ring entries from before the latest document start are zero.
    """

    h: jax.Array
    ring_b: jax.Array
    ring_x: jax.Array
    ring_la: jax.Array


def init_state(batch_size: int, *, num_heads: int, head_dim: int, state_dim: int,
               num_groups: int = 1, options: SSMOptions = SSMOptions()) -> SSMState:
    """The zero state for ``batch_size`` sequences."""
    b, h, p, n, g, r = batch_size, num_heads, head_dim, state_dim, num_groups, options.ring_size
    z = functools.partial(jnp.zeros, dtype=jnp.float32)
    return SSMState(z((b, h, n, p)), z((b, r, g, n)), z((b, r, h, p)), z((b, r, h)))


def segment_starts(segment_ids: jax.Array | None) -> jax.Array | None:
    """``bool [B, T]``: True where ``segment_ids`` changes (a new packed document begins).

    Position 0 is False: the first token continues whatever state is passed in.
    """
    if segment_ids is None:
        return None
    seg = jnp.asarray(segment_ids)
    if seg.ndim != 2:
        raise ValueError(f"`segment_ids` must have shape [batch, seq], got {seg.shape}")
    return jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)


def causal_conv(x: jax.Array, weight: jax.Array, bias: jax.Array, *,
                starts: jax.Array | None = None, history: jax.Array | None = None):
    """Depthwise causal convolution ``y_t = bias + Σ_{k<W} weight[k] ⊙ x_{t-k}``.

    Args:
      x: ``[B, T, C]``; ``weight``: ``[W, C]`` (``weight[0]`` is the current token's tap);
        ``bias``: ``[C]``.
      starts: ``bool [B, T]`` document starts: taps reaching back across a start read zero.
      history: ``[B, W-1, C]`` the inputs before ``x`` (oldest first), or None (zeros).

    Returns ``(y [B, T, C], history [B, W-1, C])``: the last ``W - 1`` inputs, zeroed where
    they precede the newest document start (so decoding continues the last document only).
    """
    b, t, ch = x.shape
    w = weight.shape[0]
    if weight.shape != (w, ch) or bias.shape != (ch,):
        raise ValueError(f"causal_conv: weight must be [W, {ch}] and bias [{ch}], got "
                         f"{weight.shape} and {bias.shape}")
    if history is None:
        history = jnp.zeros((b, w - 1, ch), x.dtype)
    full = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    doc = jnp.zeros((b, w - 1 + t), jnp.int32)
    if starts is not None:
        doc = doc.at[:, w - 1:].set(jnp.cumsum(starts.astype(jnp.int32), axis=1))
    y = jnp.broadcast_to(bias.astype(x.dtype), x.shape)
    for k in range(w):
        lo = w - 1 - k
        same = (doc[:, lo:lo + t] == doc[:, w - 1:])[..., None]
        y = y + jnp.where(same, full[:, lo:lo + t], 0) * weight[k].astype(x.dtype)
    tail = full[:, t:]
    return y, jnp.where((doc[:, t:] == doc[:, -1:])[..., None], tail, 0)


# -- shared pieces ----------------------------------------------------------------------------
def _check_inputs(x, dt, A, B, C, starts):
    if x.ndim != 4:
        raise ValueError(f"ssd: `x` must be [batch, seq, heads, head_dim], got {x.shape}")
    b, t, h, _ = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"ssd: `dt` must be [{b}, {t}, {h}], got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"ssd: `A` must be [{h}], got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, t) or C.shape != B.shape:
        raise ValueError(f"ssd: `B` and `C` must both be [{b}, {t}, groups, state_dim], got "
                         f"{B.shape} and {C.shape}")
    if h % B.shape[2]:
        raise ValueError(f"ssd: heads ({h}) must be a multiple of groups ({B.shape[2]})")
    if starts is not None and starts.shape != (b, t):
        raise ValueError(f"ssd: `starts` must be [{b}, {t}], got {starts.shape}")


def _check_state(state, x, B, options):
    b, _, h, p = x.shape
    g, n = B.shape[2:]
    r = options.ring_size
    want = ((b, h, n, p), (b, r, g, n), (b, r, h, p), (b, r, h))
    got = tuple(a.shape for a in (state.h, state.ring_b, state.ring_x, state.ring_la))
    if got != want:
        raise ValueError(f"ssd: `state` shapes {got} do not match the inputs and "
                         f"options.window={options.window} (want {want}); build it with "
                         "init_state(..., options=options)")


def _scale(s, x):
    """``s[..., None] * x``, written as an einsum: its transpose is then a dot, which XLA:CPU
    runs several times faster than the multiply-and-reduce a broadcast multiply becomes."""
    return jnp.einsum("...,...p->...p", s, x)


def _norm(v, axes):
    return jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=axes), _TINY))


def _prepare(x, dt, A, B, options):
    """``(κ x [B, T, H, P], log α [B, T, H])`` in float32, with the options applied."""
    x, dt, B = x.astype(jnp.float32), dt.astype(jnp.float32), B.astype(jnp.float32)
    la = options.decay_scale * dt * A.astype(jnp.float32)
    kappa = options.input_scale * dt
    if options.input_clip is not None:
        g = B.shape[2]
        b_norm = jnp.repeat(_norm(B, -1), x.shape[2] // g, axis=2)   # [B, T, H]
        size = kappa * b_norm * _norm(x, -1)                          # ||γ Δ B xᵀ||_F
        kappa = kappa * options.input_clip / jnp.maximum(size, options.input_clip)
    return _scale(kappa, x), la


def _grouped(a, g, axis):
    """Split the heads axis ``axis`` of ``a`` into ``(groups, heads per group)``."""
    shape = a.shape
    return a.reshape(shape[:axis] + (g, shape[axis] // g) + shape[axis + 1:])


def _ungrouped(a, axis):
    return a.reshape(a.shape[:axis] + (a.shape[axis] * a.shape[axis + 1],) + a.shape[axis + 2:])


# -- sequential ------------------------------------------------------------------------------
def _step(carry, inputs, options):
    """One token on the grouped state: ``h [B, G, K, N, P]``, ring ``[B, R, ...]``."""
    h, rb, rx, rla = carry
    xs, la, b, c, keep = inputs   # [B,G,K,P], [B,G,K], [B,G,N], [B,G,N], [B]
    h = jnp.einsum("bgk,bgknp->bgknp", jnp.exp(la) * keep[:, None, None], h) \
        + jnp.einsum("bgn,bgkp->bgknp", b, xs)
    if options.window is not None:
        rb, rx, rla = (r * keep.reshape((-1,) + (1,) * (r.ndim - 1)) for r in (rb, rx, rla))
        gamma = jnp.exp(jnp.sum(rla[:, 1:], axis=1) + la)        # ∏ α over (t - r, t]
        h = h - jnp.einsum("bgn,bgkp->bgknp", rb[:, 0], _scale(gamma, rx[:, 0]))
        rb = jnp.concatenate([rb[:, 1:], b[:, None]], axis=1)
        rx = jnp.concatenate([rx[:, 1:], xs[:, None]], axis=1)
        rla = jnp.concatenate([rla[:, 1:], la[:, None]], axis=1)
    if options.state_clip is not None:
        norm = _norm(h, (-2, -1))
        h = jnp.einsum("bgk,bgknp->bgknp",
                       options.state_clip / jnp.maximum(norm, options.state_clip), h)
    y = jnp.einsum("bgn,bgknp->bgkp", c, h)
    return (h, rb, rx, rla), y


def _to_carry(state, g):
    return (_grouped(state.h, g, 1), state.ring_b, _grouped(state.ring_x, g, 2),
            _grouped(state.ring_la, g, 2))


def _from_carry(carry):
    h, rb, rx, rla = carry
    return SSMState(_ungrouped(h, 1), rb, _ungrouped(rx, 2), _ungrouped(rla, 2))


def _initial(state, x, B, options):
    if state is None:
        b, _, h, p = x.shape
        return init_state(b, num_heads=h, head_dim=p, state_dim=B.shape[3],
                          num_groups=B.shape[2], options=options)
    _check_state(state, x, B, options)
    return state


def ssd_sequential(x, dt, A, B, C, *, options: SSMOptions = SSMOptions(),
                   starts: jax.Array | None = None, state: SSMState | None = None):
    """The recurrence, one token at a time (``lax.scan``): the reference for every option.

    Returns ``(y [B, T, H, P] in x's dtype, final SSMState)``; ``state=None`` is the zero state.
    """
    _check_inputs(x, dt, A, B, C, starts)
    state = _initial(state, x, B, options)
    g = B.shape[2]
    xs, la = _prepare(x, dt, A, B, options)
    keep = jnp.ones(x.shape[:2]) if starts is None else 1.0 - starts.astype(jnp.float32)
    seq = (_grouped(xs, g, 2), _grouped(la, g, 2), B.astype(jnp.float32),
           C.astype(jnp.float32), keep)
    carry, y = jax.lax.scan(functools.partial(_step, options=options), _to_carry(state, g),
                            jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), seq))
    return jnp.moveaxis(_ungrouped(y, 2), 0, 1).astype(x.dtype), _from_carry(carry)


def ssd_step(state: SSMState, x, dt, A, B, C, *, options: SSMOptions = SSMOptions(),
             start: jax.Array | None = None):
    """One token: ``x [B, H, P]``, ``dt [B, H]``, ``B, C [B, G, N]``, ``start bool [B]``.

    Returns ``(y [B, H, P], SSMState)``; the same update ``ssd_sequential`` scans.
    """
    y, state = ssd_sequential(x[:, None], dt[:, None], A, B[:, None], C[:, None],
                              options=options, state=state,
                              starts=None if start is None else start[:, None])
    return y[:, 0], state


# -- chunked ---------------------------------------------------------------------------------
# Layout inside the chunked core: heads-major ``[Z, G, K, nc, Q, ...]`` (Z batch, G groups, K
# heads per group, nc chunks of Q tokens), so every contraction is a batched matmul over
# leading axes; the three stages (``lcattn.ssd_stages``) carry hand-written gradients.
def _shift_chunks(a, m, axis=3):
    """``out[..., c, ...] = a[..., c - m, ...]`` along the chunk axis (zeros for c < m)."""
    if m == 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (m, 0)
    return jax.lax.slice_in_dim(jnp.pad(a, pad), 0, a.shape[axis], axis=axis)


def _ring_readout(rb, rx, rla):
    """``Σ_k (∏_{j>k} α_j) B_k (κ_k x_k)ᵀ`` over a ring, grouped: ``[B, G, K, N, P]``."""
    after = jnp.sum(rla, axis=1, keepdims=True) - jnp.cumsum(rla, axis=1)   # Σ_{j>k} log α_j
    return jnp.einsum("brgn,brgkp->bgknp", rb, jnp.exp(after)[..., None] * rx)


def _window_terms(xs, cum, b, c, doc, entering, window, q):
    """Window ``r = M·Q``: token i (chunk c, offset a) sees chunks c-M+1..c-1 whole and chunk
    c-M after offset a. Whole chunks: the entering state minus its part older than chunk
    c-M+1 (state difference); chunk c-M: a strictly upper-triangular dual form.

    Returns ``(entering with the old part removed, y from chunk c-M [Z, G, K, nc, Q, P])``.
    """
    m = window // q
    doc_end = doc[..., -1]
    doc_in = _shift_chunks(doc_end, 1)
    log_span = sum((_shift_chunks(cum[..., -1], i) for i in range(1, m)),
                   jnp.zeros_like(cum[..., -1]))
    span = jnp.exp(log_span) * (doc_in == _shift_chunks(doc_end, m))    # ∏ g over c-M+1..c-1
    entering = entering - jnp.einsum("zgkc,zgkcnp->zgkcnp", span,
                                     _shift_chunks(entering, m - 1))
    written = _scale(jnp.exp(cum[..., -1:] - cum) * (doc == doc_end[..., None]), xs)
    cb_old = jnp.einsum("zgcin,zgcjn->zgcij", c, _shift_chunks(b, m, 2)) * ~jnp.tril(
        jnp.ones((q, q), bool))
    y_old = jnp.einsum("zgcij,zgkcjp->zgkcip", cb_old, _shift_chunks(written, m))
    from_start = jnp.exp(cum) * (doc == doc_in[..., None])
    return entering, _scale(from_start * span[..., None], y_old)


def _chunked_block(xs, la, b, c, starts, h0, window, q):
    """Grouped chunked SSD over ``L = nc·q`` tokens, all in one piece.

    ``xs [Z, L, G, K, P]``, ``la [Z, L, G, K]``, ``b, c [Z, L, G, N]``, ``starts float32
    [Z, L]`` (1 where a document starts), ``h0 [Z, G, K, N, P]``. Returns
    ``(y [Z, L, G, K, P], h_L [Z, G, K, N, P])``.
    """
    z, length, g, k, p = xs.shape
    n, nc = b.shape[-1], length // q
    xs = xs.reshape(z, nc, q, g, k, p).transpose(0, 3, 4, 1, 2, 5)    # [Z, G, K, nc, Q, P]
    la = la.reshape(z, nc, q, g, k).transpose(0, 3, 4, 1, 2)          # [Z, G, K, nc, Q]
    b = b.reshape(z, nc, q, g, n).transpose(0, 3, 1, 2, 4)            # [Z, G, nc, Q, N]
    c = c.reshape(z, nc, q, g, n).transpose(0, 3, 1, 2, 4)
    # cumulative sums inside each chunk as matmuls (XLA:CPU fuses a cumsum badly; and a
    # matmul's output is materialized, so the stages' broadcasts never re-read a scan slice)
    upper = jnp.triu(jnp.ones((q, q), jnp.float32))
    cum = jnp.matmul(la, upper, precision=jax.lax.Precision.HIGHEST)  # log-decay
    counts = jnp.matmul(starts.reshape(z, 1, 1, nc, q), upper)        # starts so far
    y = ssd_stages.intra_chunk(xs, cum, b, c, counts)
    entering, h_last = ssd_stages.chunk_states(xs, cum, b, counts, h0)
    if window:
        doc = jnp.cumsum(starts, axis=1).reshape(z, 1, 1, nc, q)     # document index
        entering, y_old = _window_terms(xs, cum, b, c, doc, entering, window, q)
        y = y + y_old
    y = y + ssd_stages.readout(c, entering, cum, counts)
    return y.transpose(0, 3, 4, 1, 2, 5).reshape(z, length, g, k, p), h_last


def _chunked_blocks(x, dt, A, b, c, starts, h0, options, q, block_size):
    """Without a window, in blocks: a ``lax.scan`` over blocks of whole chunks, each prepared
    from the raw inputs and rematerialized in the backward pass, so the temporaries are
    block-sized (and stay in cache) at any length.

    ``x [Z, T, H, P]``, ``dt [Z, T, H]``, ``b, c [Z, T, G, N]`` float32, ``starts float32
    [Z, T]``, ``h0 [Z, G, K, N, P]``. Returns ``(y [Z, T, G, K, P], h_T)``.
    """
    z, t = x.shape[:2]
    g = b.shape[2]
    chunks = -(-t // q)
    n_blocks = -(-chunks // max(1, block_size // q))
    block = -(-chunks // n_blocks) * q                                # tokens per block
    pad = n_blocks * block - t                                        # front padding

    def split(a):   # [Z, T, ...] -> [n_blocks, Z, block, ...] (free for Z = 1)
        a = jnp.pad(a, [(0, 0), (pad, 0)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((z, n_blocks, block) + a.shape[2:]), 1, 0)

    def body(h, inputs):
        x, dt, b, c, starts = inputs
        xs, la = _prepare(x, dt, A, b, options)
        y, h = _chunked_block(_grouped(xs, g, 2), _grouped(la, g, 2), b, c, starts, h, None, q)
        return h, y

    h_last, y = jax.lax.scan(jax.checkpoint(body), h0,
                             tuple(map(split, (x, dt, b, c, starts))))
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape((z, n_blocks * block) + y.shape[3:])[:, pad:], h_last


def ssd_chunked(x, dt, A, B, C, *, options: SSMOptions = SSMOptions(),
                starts: jax.Array | None = None, state: SSMState | None = None,
                chunk_size: int = 64, block_size: int = 512):
    """The chunked SSD algorithm (training and prefill); same results as ``ssd_sequential``.

    ``T`` need not be a multiple of ``chunk_size`` (the sequence is front-padded with tokens
    that change nothing). Without a window, a sequence longer than ``block_size`` tokens runs
    as a scan over blocks of whole chunks (about ``block_size`` tokens each), recomputed in
    the backward pass: memory for temporaries is per block, not per sequence. With
    ``options.window = r`` (``r % chunk_size == 0``) the incoming state's ring of the last
    ``r`` insertions is replayed in front of ``x`` and the sequence runs as one block. Raises
    ValueError for ``options.state_clip`` (not expressible in chunked form: use
    ``ssd_sequential``).
    """
    checks.integer("ssd_chunked", "chunk_size", chunk_size)
    checks.integer("ssd_chunked", "block_size", block_size)
    if options.state_clip is not None:
        raise ValueError("ssd_chunked: `options.state_clip` rescales the state after every "
                         "token and has no chunked form; use ssd_sequential (impl='sequential')")
    if options.window is not None and options.window % chunk_size:
        raise ValueError(f"ssd_chunked: `options.window` ({options.window}) must be a multiple "
                         f"of `chunk_size` ({chunk_size})")
    _check_inputs(x, dt, A, B, C, starts)
    state = _initial(state, x, B, options)
    bsz, t, h, p = x.shape
    g, r = B.shape[2], options.ring_size
    b, c = B.astype(jnp.float32), C.astype(jnp.float32)
    starts = jnp.zeros((bsz, t), bool) if starts is None else starts.astype(bool)
    if not r and -(-t // chunk_size) > max(1, block_size // chunk_size):
        y, h_last = _chunked_blocks(x, dt, A, b, c, starts.astype(jnp.float32),
                                    _grouped(state.h, g, 1), options, chunk_size, block_size)
        return (_ungrouped(y, 2).astype(x.dtype),
                dataclasses.replace(state, h=_ungrouped(h_last, 1)))
    xs, la = _prepare(x, dt, A, b, options)
    if r:  # replay the ring (the windowed state is a function of the last r insertions)
        xs = jnp.concatenate([state.ring_x, xs], axis=1)
        la = jnp.concatenate([state.ring_la, la], axis=1)
        b = jnp.concatenate([state.ring_b, b], axis=1)
        c = jnp.concatenate([jnp.zeros_like(state.ring_b), c], axis=1)
        starts = jnp.concatenate([jnp.zeros((bsz, r), bool), starts], axis=1)
    pad = -(r + t) % chunk_size
    xs, la, b, c, starts = (jnp.pad(a, [(0, 0), (pad, 0)] + [(0, 0)] * (a.ndim - 2))
                            for a in (xs, la, b, c, starts))
    h0 = jnp.zeros_like(_grouped(state.h, g, 1)) if r else _grouped(state.h, g, 1)
    y, h_last = _chunked_block(_grouped(xs, g, 2), _grouped(la, g, 2), b, c,
                               starts.astype(jnp.float32), h0, options.window, chunk_size)
    y = _ungrouped(y[:, pad + r:], 2).astype(x.dtype)
    if not r:
        return y, dataclasses.replace(state, h=_ungrouped(h_last, 1))
    doc = jnp.cumsum(starts[:, -r:].astype(jnp.int32), axis=1)
    live = (doc == doc[:, -1:]).astype(jnp.float32)                  # after the last start
    rb, rx, rla = b[:, -r:] * live[..., None, None], xs[:, -r:] * live[..., None, None], \
        la[:, -r:] * live[..., None]
    h_win = _ring_readout(rb, _grouped(rx, g, 2), _grouped(rla, g, 2))
    return y, SSMState(_ungrouped(h_win, 1), rb, rx, rla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _pallas(x, dt, A, B, C, starts, h0, options, chunk_size, interpret):
    xs, la = _prepare(x, dt, A, B, options)
    return ssd_scan.ssd_chunk_scan(xs, la, B, C, starts=starts, initial_state=h0,
                                   chunk_size=chunk_size, interpret=interpret)


def _pallas_fwd(x, dt, A, B, C, starts, h0, options, chunk_size, interpret):
    out = _pallas(x, dt, A, B, C, starts, h0, options, chunk_size, interpret)
    return out, (x, dt, A, B, C, starts, h0)


def _pallas_bwd(options, chunk_size, interpret, res, cotangents):
    """The kernel is forward only: gradients come from the chunked XLA form (recomputed)."""
    del interpret
    *args, starts, h0 = res

    def chunked(x, dt, A, B, C, h0):
        state = init_state(x.shape[0], num_heads=x.shape[2], head_dim=x.shape[3],
                           state_dim=B.shape[3], num_groups=B.shape[2])
        y, state = ssd_chunked(x, dt, A, B, C, options=options, starts=starts,
                               state=dataclasses.replace(state, h=h0), chunk_size=chunk_size)
        return y.astype(jnp.float32), state.h

    _, vjp = jax.vjp(chunked, *args, h0)
    grads = vjp(cotangents)
    return grads[:5] + (None, grads[5])


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def ssd_pallas(x, dt, A, B, C, *, options: SSMOptions = SSMOptions(),
               starts: jax.Array | None = None, state: SSMState | None = None,
               chunk_size: int = 64, interpret: bool | None = None):
    """The chunked algorithm as one Pallas kernel (``pallas_kernels.ssd_scan``): each
    program walks the chunks of one head with the state in registers. Forward only (gradients
    recompute ``ssd_chunked``); ``interpret=None`` runs interpret mode off-GPU. Same results as
    ``ssd_sequential`` for every option except ``window`` and ``state_clip`` (ValueError)."""
    for name in ("window", "state_clip"):
        if getattr(options, name) is not None:
            raise ValueError(f"ssd_pallas: `options.{name}` is not supported by the Pallas "
                             "kernel; use impl='chunked' or 'sequential'")
    checks.integer("ssd_pallas", "chunk_size", chunk_size)
    _check_inputs(x, dt, A, B, C, starts)
    state = _initial(state, x, B, options)
    starts = jnp.zeros(x.shape[:2], bool) if starts is None else starts.astype(bool)
    y, h = _pallas(x, dt, A, B, C, starts, state.h, options, int(chunk_size), interpret)
    return y.astype(x.dtype), dataclasses.replace(state, h=h)


def ssd(x, dt, A, B, C, *, options: SSMOptions = SSMOptions(), starts=None, state=None,
        impl: str = "auto", chunk_size: int = 64):
    """``ssd_chunked``, ``ssd_sequential`` or ``ssd_pallas``; ``impl="auto"``: sequential
    for one token or ``options.state_clip``, chunked otherwise. Returns ``(y, SSMState)``."""
    if impl not in IMPLS:
        raise ValueError(f"ssd: `impl` must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        sequential = options.state_clip is not None or x.shape[1] == 1
        impl = "sequential" if sequential else "chunked"
    if impl == "sequential":
        return ssd_sequential(x, dt, A, B, C, options=options, starts=starts, state=state)
    if impl == "pallas":
        return ssd_pallas(x, dt, A, B, C, options=options, starts=starts, state=state,
                          chunk_size=chunk_size)
    return ssd_chunked(x, dt, A, B, C, options=options, starts=starts, state=state,
                       chunk_size=chunk_size)
