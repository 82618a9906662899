"""Position encodings: RoPE (with Linear / NTK / DynamicNTK / YaRN / Llama3 scaling), ALiBi, NoPE.

``attend`` receives unrotated q/k and absolute positions and calls ``rotate`` itself, because
LM-Infinite's distance limit needs a second, differently positioned view of the same q/k.

* RoPE, half-split ("rotate_half", Llama) convention: with ``x = [x1, x2]`` the two halves of
  the head dim and ``angle_i = pos * inv_freq_i``, ``inv_freq_i = theta^(-2i/d)``,
  ``i = 0..d/2-1``::

      rotate(x, pos) = [x1 cos - x2 sin, x2 cos + x1 sin] * mscale

  so that ``<rotate(q, a), rotate(k, b)>`` depends on ``a - b`` only. The scalings below are
  the forms Hugging Face ``transformers`` computes (``modeling_rope_utils``, ``rope_type`` in
  parentheses), so pretrained checkpoints load unchanged.
* ``Linear(f)`` (position interpolation, Chen et al. 2023; ``"linear"``): ``pos / f``.
* ``NTK(f)`` (static NTK-aware scaling, bloc97 2023): base ``theta * f^(d/(d-2))``.
* ``DynamicNTK(f, L)`` (``"dynamic"``; emozilla 2023): at sequence length ``s``, base
  ``theta * (f s / L - (f - 1))^(d/(d-2))`` when ``s > L``, else ``theta``. ``s`` is a
  (traced) argument of ``rotate``; inside ``attend`` it is ``max(q_positions) + 1`` of the
  call, over the whole batch (``rotation_length``), and both q and k are rotated with it. So
  decoding against a cache of *unrotated* keys equals the full forward at the current length;
  ``transformers``' cache instead keeps each key rotated with the base of the step that
  cached it. Computed in float32 with jnp, like ``transformers``.
* ``YaRN(f, L)`` (Peng et al. 2023, "YaRN", NTK-by-parts + temperature; ``"yarn"``): the ramp
  is linear in the *dimension index*, as in the YaRN authors' code and ``transformers`` (not
  in the wavelength ratio ``L / lambda_i`` of the paper's eqs. 17-20). The correction
  dimension of ``n`` rotations over ``L`` is ``c(n) = d ln(L / (2 pi n)) / (2 ln theta)``;
  ``low = floor(c(beta_fast))``, ``high = ceil(c(beta_slow))`` (unrounded when
  ``truncate=False``), clamped to ``low >= 0``, ``high <= d - 1``, and
  ``high += 0.001`` if they are equal. With ``ramp_i = clip((i - low) / (high - low), 0, 1)``
  and extrapolation weight ``gamma_i = 1 - ramp_i``:
  ``inv_freq'_i = (1 - gamma_i) inv_freq_i / f + gamma_i inv_freq_i``. q and k are both
  scaled by ``mscale = 0.1 ln f + 1`` (1 when ``f <= 1``; logits by ``mscale^2``), or by an
  explicit ``attention_factor``.
* ``Llama3(f, low_freq_factor, high_freq_factor, L)`` (Llama 3.1; ``"llama3"``): with
  wavelength ``w_i = 2 pi / inv_freq_i``: ``w_i > L / low_freq_factor`` -> ``inv_freq_i / f``;
  ``w_i < L / high_freq_factor`` -> ``inv_freq_i``; in between, with
  ``smooth = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)``,
  ``(1 - smooth) inv_freq_i / f + smooth inv_freq_i``. No attention factor.
* ``ALiBi()``: logit bias ``-m_h |q_pos - k_pos|`` with the paper's per-head slopes ``m_h``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lcattn.checks import integer as _integer
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
class DynamicNTK:
    """Dynamic NTK scaling (``transformers``' ``"dynamic"``): base
    ``theta * (factor s / original_length - (factor - 1))^(d / (d - 2))`` at sequence length
    ``s > original_length``, ``theta`` otherwise; ``s`` is given to ``RoPE.rotate``."""

    factor: float
    original_length: int

    def __post_init__(self):
        _positive("DynamicNTK", "factor", self.factor)
        _integer("DynamicNTK", "original_length", self.original_length)


@dataclasses.dataclass(frozen=True)
class YaRN:
    """YaRN: NTK-by-parts ramp, linear in the dimension index between the correction
    dimensions of ``beta_fast`` and ``beta_slow`` rotations (the YaRN authors' code and
    ``transformers``), plus attention factor ``0.1 ln(factor) + 1`` on q and k (or
    ``attention_factor``). ``truncate`` rounds the correction dimensions (floor / ceil)."""

    factor: float
    original_length: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None

    def __post_init__(self):
        _positive("YaRN", "factor", self.factor)
        _integer("YaRN", "original_length", self.original_length)
        _positive("YaRN", "beta_slow", self.beta_slow)
        if not self.beta_fast > self.beta_slow:
            raise ValueError(f"YaRN: `beta_fast` ({self.beta_fast}) must exceed `beta_slow` "
                             f"({self.beta_slow})")
        if not isinstance(self.truncate, (bool, np.bool_)):
            raise ValueError(f"YaRN: `truncate` must be a bool, got {self.truncate!r}")
        _positive("YaRN", "attention_factor", self.attention_factor, allow_none=True)

    def correction_range(self, head_dim: int, theta: float) -> tuple[float, float]:
        """``(low, high)`` dimension indices of the ramp, clamped to ``[0, head_dim - 1]``."""
        def dim(rotations):
            return (head_dim * math.log(self.original_length / (2 * math.pi * rotations))
                    / (2 * math.log(theta)))

        low, high = dim(self.beta_fast), dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        return float(low), float(high)

    def mscale(self) -> float:
        """Factor on q and on k: ``attention_factor``, else ``0.1 ln f + 1`` (1 for f <= 1)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


@dataclasses.dataclass(frozen=True)
class Llama3:
    """Llama 3.1's scaling: frequencies with wavelength above ``original_length /
    low_freq_factor`` divided by ``factor``, below ``original_length / high_freq_factor``
    kept, smoothly interpolated in between (in ``original_length / wavelength``)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_length: int = 8192

    def __post_init__(self):
        _positive("Llama3", "factor", self.factor)
        _positive("Llama3", "low_freq_factor", self.low_freq_factor)
        _positive("Llama3", "high_freq_factor", self.high_freq_factor)
        _integer("Llama3", "original_length", self.original_length)
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"Llama3: `high_freq_factor` ({self.high_freq_factor}) must exceed "
                             f"`low_freq_factor` ({self.low_freq_factor})")


SCALINGS = (Linear, NTK, DynamicNTK, YaRN, Llama3)


def rotation_length(q_pos):
    """The sequence length a length-dependent encoding (``DynamicNTK``) rotates at:
    ``max(q_pos) + 1`` over the whole array (all rows, as ``transformers`` takes the max over
    the batch), int32. ``attend`` computes it once per call from the *query* positions and
    passes it to the q and the k rotation (also in LM-Infinite's sink branch)."""
    if isinstance(q_pos, jax.Array):
        return jnp.max(q_pos).astype(jnp.int32) + 1
    return np.int32(np.max(q_pos) + 1)


class Position:
    """Base: identity rotation, no bias."""

    def rotate(self, x, pos, length=None):
        """``x [B, T, H, D]`` at positions ``pos [B, T]`` -> float32 ``[B, T, H, D]``.

        ``length`` (int or traced int32 scalar; None: ``max(pos) + 1``) is the sequence length,
        used only by length-dependent scalings (``RoPE(scaling=DynamicNTK(...))``)."""
        return x.astype(jnp.float32)

    def slopes(self, num_heads: int):
        """Per-head ALiBi slopes ``[H]`` (numpy), or None when the encoding adds no bias."""
        return None


@dataclasses.dataclass(frozen=True)
class NoPE(Position):
    """No position information."""


@dataclasses.dataclass(frozen=True)
class RoPE(Position):
    """Rotary embedding (half-split convention), optionally scaled by ``Linear``, ``NTK``,
    ``DynamicNTK``, ``YaRN`` or ``Llama3``."""

    theta: float = 10000.0
    scaling: Linear | NTK | DynamicNTK | YaRN | Llama3 | None = None

    def __post_init__(self):
        _positive("RoPE", "theta", self.theta)
        if not isinstance(self.scaling, (*SCALINGS, type(None))):
            raise ValueError(f"RoPE: `scaling` must be None, Linear, NTK, DynamicNTK, YaRN or "
                             f"Llama3, got {self.scaling!r}")

    def frequencies(self, head_dim: int):
        """``(inv_freq [D/2], position divisor, mscale)`` as numpy float64 / floats.

        ``DynamicNTK``: the frequencies at lengths ``<= original_length`` (plain RoPE); longer
        lengths are handled in ``rotate``."""
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
            low, high = sc.correction_range(head_dim, theta)
            ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low),
                           0.0, 1.0)
            gamma = 1.0 - ramp  # extrapolation weight: 1 on the fast (low-index) dims
            inv = (1 - gamma) * inv / sc.factor + gamma * inv
            mscale = sc.mscale()
        elif isinstance(sc, Llama3):
            wavelength = 2 * math.pi / inv
            smooth = ((sc.original_length / wavelength - sc.low_freq_factor)
                      / (sc.high_freq_factor - sc.low_freq_factor))
            mid = (1 - smooth) * inv / sc.factor + smooth * inv
            inv = np.where(wavelength > sc.original_length / sc.low_freq_factor, inv / sc.factor,
                           np.where(wavelength < sc.original_length / sc.high_freq_factor, inv,
                                    mid))
        return inv, divisor, mscale

    def dynamic_frequencies(self, head_dim: int, length):
        """``DynamicNTK``'s ``inv_freq [D/2]`` (jnp float32) at sequence length ``length``
        (int or traced int32 scalar)."""
        sc = self.scaling
        plain = jnp.asarray(self.frequencies(head_dim)[0], jnp.float32)
        s = jnp.asarray(length, jnp.float32)
        s_long = jnp.maximum(s, sc.original_length)  # keeps the unused branch finite
        base = self.theta * ((sc.factor * s_long / sc.original_length) - (sc.factor - 1)) ** (
            head_dim / (head_dim - 2))
        scaled = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
        return jnp.where(s > sc.original_length, scaled, plain)

    def rotate(self, x, pos, length=None):
        inv, divisor, mscale = self.frequencies(x.shape[-1])
        inv = jnp.asarray(inv, jnp.float32)
        if isinstance(self.scaling, DynamicNTK):
            inv = self.dynamic_frequencies(x.shape[-1],
                                           rotation_length(pos) if length is None else length)
        p = jnp.asarray(pos, jnp.float32) / divisor
        angle = p[..., None, None] * inv  # [B, T, 1, D/2]
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


__all__ = ["Position", "NoPE", "RoPE", "Linear", "NTK", "DynamicNTK", "YaRN", "Llama3", "ALiBi",
           "SCALINGS", "alibi_slopes", "alibi_bias", "rotation_length"]
