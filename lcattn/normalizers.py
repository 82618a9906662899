"""Attention normalizers: softmax, LSSA softplus, and LSSAR re-weighting.

Each normalizer has two faces of the same math:

* ``dense_weights(s, visible, ctx) -> P``: the paper's equation on a whole score matrix; the
  ``reference`` backend (the oracle) uses it.
* a streaming form for blockwise backends (xla, Pallas, ring): every normalizer is an online
  softmax over per-tile *log-weights* ``t = log_weight(s, ctx, pass_idx)`` (``-inf`` = weight 0).
  The state ``(m, l, acc)`` is the running max of ``t``, the sum of ``exp(t - m)`` and the
  weighted sum of values; ``init`` / ``update`` / ``merge`` / ``finalize`` are shared. ``merge``
  combines partial states over disjoint key sets (ring steps, split-K, the LM-Infinite sink
  branch). Working in log space means nothing overflows in float32, and a backward pass needs
  only ``d t / d s``, which blockwise backends take with ``jax.vjp`` of ``log_weight``.

Shapes: scores ``s [..., rows, keys]`` (float32, already scaled by ``prepare``); row context
``ctx`` is a dict of ``[..., rows, 1]`` float32 arrays: ``count`` (N_i, the number of visible
keys), ``q_pos`` (query position) and ``lse`` (log row sum of the previous pass).

A query row with no visible key (and an LSSAR row whose re-weighted mass is all zero) returns
0, never NaN; its ``lse`` is ``-inf``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _safe_div(a, b):
    """``a / b`` with 0 where ``b == 0`` (and zero, finite gradients there)."""
    ok = b > 0
    return jnp.where(ok, a / jnp.where(ok, b, 1.0), 0.0)


def finite(x):
    """``isfinite(x)`` written as a comparison (Mosaic GPU lowers no ``is_finite``)."""
    return jnp.abs(x) < jnp.inf


def log1p(y):
    """``log(1 + y)`` for ``0 <= y <= 1`` with multiply-adds and one division (Mosaic GPU
    lowers no ``log1p``, ``custom_jvp`` or ``stop_gradient``): ``2 atanh(z)`` with
    ``z = y / (2 + y) <= 1/3``, as ``2 z (1 + w/3 + w^2/5 + ... + w^8/17)``, ``w = z^2``;
    the series' remainder is below ``w^9 / 19 < 2e-10`` relative, so value and derivative are
    float32-exact to a few ulps."""
    z = y / (2.0 + y)
    w = z * z
    series = jnp.zeros_like(w) + 1.0 / 17.0
    for odd in range(15, 0, -2):
        series = series * w + 1.0 / odd
    return 2.0 * z * series


def softplus(s):
    """``log(1 + e^s) = max(s, 0) + log1p(e^-|s|)`` in ops every backend lowers (written with
    one comparison, so the derivative at 0 is ``sigmoid(0) = 1/2``)."""
    pos = s > 0
    return jnp.where(pos, s, 0.0) + log1p(jnp.exp(jnp.where(pos, -s, s)))


def log_softplus(s):
    """``log(softplus(s))`` without underflow for very negative ``s``."""
    low = s < -20.0
    return jnp.where(low, s, jnp.log(softplus(jnp.where(low, 0.0, s))))


def _l2_normalize(x):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-30))


class Normalizer:
    """Shared streaming machinery; subclasses define ``prepare``, ``log_weight`` and
    ``dense_weights``."""

    num_passes: int = 1
    needs_count: bool = False
    # Whether small score errors grow large in the weights' gradients (LSSAR's power p):
    # kernels with 16-bit matmul operands then compute q k^T from split operands.
    amplifies_score_error: bool = False

    def uses_values(self, pass_idx: int) -> bool:
        """Whether pass ``pass_idx`` accumulates values (earlier passes only collect row sums)."""
        return pass_idx == self.num_passes - 1

    # -- streaming state -------------------------------------------------------------------
    @staticmethod
    def init(rows_shape, dv: int | None):
        """State for rows ``rows_shape`` (e.g. ``[..., rows]``) and value width ``dv`` (None: no
        values)."""
        m = jnp.full(tuple(rows_shape) + (1,), NEG_INF, jnp.float32)
        l = jnp.zeros(tuple(rows_shape) + (1,), jnp.float32)
        acc = None if dv is None else jnp.zeros(tuple(rows_shape) + (dv,), jnp.float32)
        return m, l, acc

    @staticmethod
    def update(state, t, v=None):
        """Fold a tile of log-weights ``t [..., rows, keys]`` and values ``v [..., keys, dv]``."""
        m, l, acc = state
        m_new = jnp.maximum(m, jnp.max(t, axis=-1, keepdims=True))
        m_safe = jnp.where(finite(m_new), m_new, 0.0)
        p = jnp.exp(t - m_safe)
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
        if acc is not None:
            pv = jnp.matmul(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc = alpha * acc + pv
        return m_new, l, acc

    @staticmethod
    def merge(a, b):
        """Combine two states over disjoint key sets."""
        (ma, la, acca), (mb, lb, accb) = a, b
        m = jax.lax.stop_gradient(jnp.maximum(ma, mb))  # a stabilizer: the result ignores it
        m_safe = jnp.where(finite(m), m, 0.0)
        wa, wb = jnp.exp(ma - m_safe), jnp.exp(mb - m_safe)
        acc = None if acca is None else wa * acca + wb * accb
        return m, wa * la + wb * lb, acc

    @staticmethod
    def finalize(state):
        """``(out [..., rows, dv] or None, lse [..., rows])`` from a state."""
        m, l, acc = state
        ok = l > 0
        lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)[..., 0]
        return (None if acc is None else _safe_div(acc, l)), lse

    @staticmethod
    def from_result(out, lse):
        """The state whose ``finalize`` gives ``(out, lse)`` (to ``merge`` finished results)."""
        ok = finite(lse)[..., None]
        m = jnp.where(ok, lse[..., None], NEG_INF)
        return m, ok.astype(jnp.float32), out

    # -- math --------------------------------------------------------------------------------
    def prepare(self, q, k, log_count):
        """Scale ``q [..., T, H, D]`` / ``k``; ``log_count`` broadcasts to ``q.shape[:-1]``."""
        raise TypeError(f"{type(self).__name__} must define prepare")

    def log_weight(self, s, ctx, pass_idx: int = 0):
        raise TypeError(f"{type(self).__name__} must define log_weight")

    def dense_weights(self, s, visible, ctx):
        raise TypeError(f"{type(self).__name__} must define dense_weights")


@dataclasses.dataclass(frozen=True)
class Softmax(Normalizer):
    """``softmax_j(scale * q_i . k_j + bias)``; optional soft-capping ``c * tanh(s / c)``.

    ``scale`` defaults to ``1 / sqrt(head_dim)``.
    """

    softcap: float | None = None
    scale: float | None = None

    def __post_init__(self):
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"Softmax: `softcap` must be > 0 or None, got {self.softcap!r}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"Softmax: `scale` must be > 0 or None, got {self.scale!r}")

    def prepare(self, q, k, log_count=None):
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return q.astype(jnp.float32) * scale, k.astype(jnp.float32)

    def log_weight(self, s, ctx=None, pass_idx=0):
        return s if self.softcap is None else self.softcap * jnp.tanh(s / self.softcap)

    def dense_weights(self, s, visible, ctx=None):
        t = jnp.where(visible, self.log_weight(s), NEG_INF)
        m = jnp.max(t, axis=-1, keepdims=True)
        e = jnp.exp(t - jnp.where(finite(m), m, 0.0))
        return _safe_div(e, jnp.sum(e, axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class Softplus(Normalizer):
    """LSSA (eq. 4): ``A_ij = softplus(s_ij) / sum_j softplus(s_ij)`` over visible keys, with
    ``s_ij = log(d) * log(N_i) * <q_i/|q_i|, k_j/|k_j|>`` (d: head dim; N_i: visible keys)."""

    needs_count = True

    def prepare(self, q, k, log_count):
        d = q.shape[-1]
        row_scale = math.log(d) * jnp.asarray(log_count, jnp.float32)[..., None]
        return (_l2_normalize(q.astype(jnp.float32)) * row_scale,
                _l2_normalize(k.astype(jnp.float32)))

    def log_weight(self, s, ctx=None, pass_idx=0):
        return log_softplus(s)

    def dense_weights(self, s, visible, ctx=None):
        w = jnp.where(visible, jax.nn.softplus(s), 0.0)
        return _safe_div(w, jnp.sum(w, axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class Reweighted(Softplus):
    """LSSAR (eq. 5): ``R_ij = ReLU(N_i * A_ij - O_i)^p`` renormalized over j, with ``A`` the LSSA
    weights and ``O_i = 0`` for query positions ``< warmup_rows``, else 1.

    Two passes over K: the first collects the LSSA row sums (as ``lse``), the second
    re-weights. The power is taken as ``p * log(x)`` in log space (the streaming form) or on
    ``x / max_j x`` (the dense form), so float32 never overflows.
    """

    p: float = 15.0
    warmup_rows: int = 3
    num_passes = 2
    amplifies_score_error = True  # bf16 q k^T moves dQ / dK by ~10 % at p = 15

    def __post_init__(self):
        if not self.p > 0:
            raise ValueError(f"Reweighted: `p` must be > 0, got {self.p!r}")
        if isinstance(self.warmup_rows, bool) or not isinstance(self.warmup_rows, int) \
                or self.warmup_rows < 0:
            raise ValueError(
                f"Reweighted: `warmup_rows` must be an integer >= 0, got {self.warmup_rows!r}")

    def _offset(self, q_pos):
        return jnp.where(q_pos < self.warmup_rows, 0.0, 1.0)

    def log_weight(self, s, ctx=None, pass_idx=0):
        if pass_idx == 0:
            return log_softplus(s)
        x = ctx["count"] * jnp.exp(log_softplus(s) - ctx["lse"]) - self._offset(ctx["q_pos"])
        pos = x > 0
        return jnp.where(pos, self.p * jnp.log(jnp.where(pos, x, 1.0)), NEG_INF)

    def dense_weights(self, s, visible, ctx):
        a = super().dense_weights(s, visible)
        x = jnp.where(visible, ctx["count"] * a - self._offset(ctx["q_pos"]), 0.0)
        r = jnp.maximum(x, 0.0)
        pos = r > 0
        top = jnp.max(r, axis=-1, keepdims=True)
        w = jnp.where(pos, jnp.where(pos, _safe_div(r, top), 1.0) ** self.p, 0.0)
        return _safe_div(w, jnp.sum(w, axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class VisibleCount(Normalizer):
    """Weight 1 on every visible key: the finished ``lse`` is ``log N_i`` (a counting pass)."""

    def prepare(self, q, k, log_count=None):
        return q, k

    def log_weight(self, s, ctx=None, pass_idx=0):
        return jnp.zeros_like(s)

    def dense_weights(self, s, visible, ctx=None):
        return visible.astype(jnp.float32)


__all__ = ["Normalizer", "Softmax", "Softplus", "Reweighted", "VisibleCount", "finite", "log1p",
           "log_softplus", "softplus"]
