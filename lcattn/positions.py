"""Position encodings: RoPE (with Linear / NTK / YaRN scaling), ALiBi, NoPE.

``attend`` receives unrotated q/k and absolute positions and calls ``rotate`` itself, because
LM-Infinite's distance limit needs a second, differently positioned view of the same q/k.

* RoPE, half-split ("rotate_half", Llama) convention: with ``x = [x1, x2]`` the two halves of
  the head dim and ``angle_i = pos * inv_freq_i``, ``inv_freq_i = theta^(-2i/d)``::

      rotate(x, pos) = [x1 cos - x2 sin, x2 cos + x1 sin] * mscale

  so that ``<rotate(q, a), rotate(k, b)>`` depends on ``a - b`` only.
* ``Linear(f)`` (position interpolation): ``pos / f``. ``NTK(f)``: ``theta * f^(d/(d-2))``.
  ``YaRN(f, L)`` ("YaRN", eqs. 17-20): with wavelength ``lambda_i = 2 pi / inv_freq_i``,
  ``r_i = L / lambda_i`` and ramp
  ``gamma_i = clip((r_i - beta_slow)/(beta_fast - beta_slow), 0, 1)``,
  ``inv_freq'_i = (1 - gamma_i) inv_freq_i / f + gamma_i inv_freq_i``; q and k are both scaled
  by ``mscale = 0.1 ln f + 1`` (logits by ``mscale^2``).
* ``ALiBi()``: logit bias ``-m_h |q_pos - k_pos|`` with the paper's per-head slopes ``m_h``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lcattn.checks import positive as _positive


def broadcast(name: str, value, batch: int, length: int):
    """Token positions (or segment ids) as int32 ``[batch, length]``.

    ``value`` None gives ``arange(length)`` per row; ``[length]`` or ``[1, length]`` is
    broadcast over the batch. numpy stays numpy (static: kernels build block lists at trace
    time), jax arrays stay traced. Errors name the argument ``name``.
    """
    if value is None:
        return np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    arr = value if isinstance(value, jax.Array) else np.asarray(value)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != length or arr.shape[0] not in (1, batch):
        raise ValueError(f"`{name}` must have shape [batch={batch}, seq={length}] or [seq], "
                         f"got {tuple(np.shape(value))}")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"`{name}` must hold integers, got dtype {arr.dtype}")
    xp = jnp if isinstance(arr, jax.Array) else np
    return xp.broadcast_to(arr.astype(np.int32), (batch, length))


@dataclasses.dataclass(frozen=True)
class Linear:
    """Position interpolation: positions divided by ``factor``."""

    factor: float

    def __post_init__(self):
        _positive("Linear", "factor", self.factor)


@dataclasses.dataclass(frozen=True)
class NTK:
    """NTK-aware scaling: RoPE base ``theta * factor^(d / (d - 2))``."""

    factor: float

    def __post_init__(self):
        _positive("NTK", "factor", self.factor)


@dataclasses.dataclass(frozen=True)
class YaRN:
    """YaRN: per-frequency interpolation ramp plus attention temperature ``0.1 ln(factor) + 1``."""

    factor: float
    original_length: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        _positive("YaRN", "factor", self.factor)
        _positive("YaRN", "original_length", self.original_length)
        if not self.beta_fast > self.beta_slow:
            raise ValueError(f"YaRN: `beta_fast` ({self.beta_fast}) must exceed `beta_slow` "
                             f"({self.beta_slow})")


class Position:
    """Base: identity rotation, no bias."""

    def rotate(self, x, pos):
        """``x [B, T, H, D]`` at positions ``pos [B, T]`` -> float32 ``[B, T, H, D]``."""
        return x.astype(jnp.float32)

    def slopes(self, num_heads: int):
        """Per-head ALiBi slopes ``[H]`` (numpy), or None when the encoding adds no bias."""
        return None


@dataclasses.dataclass(frozen=True)
class NoPE(Position):
    """No position information."""


@dataclasses.dataclass(frozen=True)
class RoPE(Position):
    """Rotary embedding (half-split convention), optionally ``Linear``/``NTK``/``YaRN`` scaled."""

    theta: float = 10000.0
    scaling: Linear | NTK | YaRN | None = None

    def __post_init__(self):
        _positive("RoPE", "theta", self.theta)
        if not isinstance(self.scaling, (Linear, NTK, YaRN, type(None))):
            raise ValueError(f"RoPE: `scaling` must be None, Linear, NTK or YaRN, "
                             f"got {self.scaling!r}")

    def frequencies(self, head_dim: int):
        """``(inv_freq [D/2], position divisor, mscale)`` as numpy float64 / floats."""
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even `head_dim`, got {head_dim}")
        sc, theta = self.scaling, self.theta
        if isinstance(sc, NTK):
            theta = theta * sc.factor ** (head_dim / (head_dim - 2))
        inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        divisor, mscale = 1.0, 1.0
        if isinstance(sc, Linear):
            divisor = sc.factor
        elif isinstance(sc, YaRN):
            ratio = sc.original_length * inv / (2 * math.pi)
            gamma = np.clip((ratio - sc.beta_slow) / (sc.beta_fast - sc.beta_slow), 0.0, 1.0)
            inv = (1 - gamma) * inv / sc.factor + gamma * inv
            mscale = 0.1 * math.log(sc.factor) + 1.0 if sc.factor > 1 else 1.0
        return inv, divisor, mscale

    def rotate(self, x, pos):
        inv, divisor, mscale = self.frequencies(x.shape[-1])
        p = jnp.asarray(pos, jnp.float32) / divisor
        angle = p[..., None, None] * jnp.asarray(inv, jnp.float32)  # [B, T, 1, D/2]
        cos, sin = jnp.cos(angle) * mscale, jnp.sin(angle) * mscale
        x = x.astype(jnp.float32)
        x1, x2 = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi slopes (Press et al.): ``2^(-8h/H)`` for ``h = 1..H`` when H is a power of two;
    otherwise the slopes of the nearest lower power of two ``n``, then every other slope of
    ``2n`` for the remaining heads."""
    if num_heads < 1:
        raise ValueError(f"ALiBi: `num_heads` must be >= 1, got {num_heads}")

    def power_of_two(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(n) + power_of_two(2 * n)[0::2][: num_heads - n]
    return np.asarray(slopes, np.float64)


def alibi_bias(q_pos, k_pos, slopes):
    """``-slopes * |q_pos - k_pos|`` (float32; all arguments broadcast)."""
    distance = jnp.abs(jnp.asarray(q_pos) - jnp.asarray(k_pos)).astype(jnp.float32)
    return -jnp.asarray(slopes, jnp.float32) * distance


@dataclasses.dataclass(frozen=True)
class ALiBi(Position):
    """Attention with linear biases: distance bias ``-m_h |i - j|``, no rotation."""

    def slopes(self, num_heads: int):
        return alibi_slopes(num_heads)


__all__ = ["Position", "NoPE", "RoPE", "Linear", "NTK", "YaRN", "ALiBi", "alibi_slopes",
           "alibi_bias"]
