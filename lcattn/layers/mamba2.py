r"""Mamba-2 mixer layer (Dao & Gu, 2024, §7.1): a thin NNX wrapper around ``lcattn.ssm``.

For ``x [B, T, D]`` with ``d_inner = expand·D = H·P`` (``H`` heads of width ``P = head_dim``),
``G`` groups and state width ``N``::

    x', z  = x W_x, x W_z                       [B, T, H, P]
    B', C' = x W_B, x W_C                       [B, T, G, N]
    Δ      = softplus(x W_Δ + Δ_bias)           [B, T, H]
    x', B', C' <- silu(causal_conv(x', B', C'))  depthwise, width W, reset at document starts
    y      = SSD(x', Δ, A = -exp(A_log), B', C') + D ⊙ x'      (lcattn.ssm)
    out    = RMSNorm_gated(y ⊙ silu(z)) W_out                   [B, T, D]

The gated RMSNorm normalizes each head's ``P`` channels (``gated_norm="head"``, lcattn's
default: heads shard independently) or each group's ``(H/G)·P`` channels
(``gated_norm="group"``: the official Mamba-2 code and ``transformers``, group size
``d_inner / G``). The
decoding cache (``Mamba2Cache``) has a constant size: the last ``W - 1`` conv inputs and the
SSM state (plus, with a sliding window ``r``, the last ``r`` insertions).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lcattn import checks, sharding, ssm
from lcattn.layers.params import fan_in, param

GATED_NORMS = ("head", "group")


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Sizes and options of a Mamba-2 layer (hashable; the model width comes separately).

    Attributes:
      head_dim: ``P``; the layer has ``expand·d_model / head_dim`` heads. None: as many SSM
        heads as the model has attention heads (``for_model``; ``DecoderLM`` resolves it).
      state_dim: ``N``, the state width per head (the state is ``N×P`` per head).
      expand: ``d_inner / d_model``.
      num_groups: ``G``, groups of heads sharing ``B`` and ``C``.
      conv_width: ``W``, taps of the depthwise causal convolution.
      chunk_size: ``Q`` of the chunked SSD algorithm.
      options: ``lcattn.ssm.SSMOptions`` (state-collapse mitigations).
      impl: ``"auto"`` (chunked; sequential for one token or with ``options.state_clip``),
        ``"chunked"``, ``"sequential"`` or ``"pallas"`` (``lcattn.ssm.ssd_pallas``: no
        ``window`` / ``state_clip``).
      gated_norm: ``"head"`` (normalize each head's ``P`` channels) or ``"group"`` (each
        group's ``(H/G)·P`` channels, as the released Mamba-2 checkpoints do).
      norm_eps: epsilon of the gated RMSNorm.
    """

    head_dim: int | None = None
    state_dim: int = 64
    expand: int = 2
    num_groups: int = 1
    conv_width: int = 4
    chunk_size: int = 64
    options: ssm.SSMOptions = ssm.SSMOptions()
    impl: str = "auto"
    gated_norm: str = "head"
    norm_eps: float = 1e-6

    def __post_init__(self):
        checks.choice("Mamba2Config", "gated_norm", self.gated_norm, GATED_NORMS)
        checks.positive("Mamba2Config", "norm_eps", self.norm_eps)
        checks.integer("Mamba2Config", "head_dim", self.head_dim, allow_none=True)
        for name in ("state_dim", "expand", "num_groups", "conv_width", "chunk_size"):
            checks.integer("Mamba2Config", name, getattr(self, name))
        if not isinstance(self.options, ssm.SSMOptions):
            raise ValueError(f"Mamba2Config: `options` must be an lcattn.ssm.SSMOptions, got "
                             f"{self.options!r}")
        if self.impl not in ssm.IMPLS:
            raise ValueError(f"Mamba2Config: `impl` must be one of {ssm.IMPLS}, got "
                             f"{self.impl!r}")
        if self.impl == "pallas" and (self.options.window is not None
                                      or self.options.state_clip is not None):
            raise ValueError("Mamba2Config: `options.window` and `options.state_clip` are not "
                             "supported by impl='pallas'; use impl='chunked', 'sequential' or "
                             "'auto'")
        if self.impl != "sequential" and self.options.window is not None \
                and self.options.window % self.chunk_size:
            raise ValueError(f"Mamba2Config: `options.window` ({self.options.window}) must be a "
                             f"multiple of `chunk_size` ({self.chunk_size}) for the chunked "
                             "implementation (or set impl='sequential')")
        if self.impl == "chunked" and self.options.state_clip is not None:
            raise ValueError("Mamba2Config: `options.state_clip` needs impl='sequential' or "
                             "'auto', got impl='chunked'")

    def for_model(self, d_model: int, num_heads: int) -> "Mamba2Config":
        """This config with ``head_dim=None`` resolved to ``expand·d_model / num_heads``."""
        if self.head_dim is not None:
            return self
        if (self.expand * d_model) % num_heads:
            raise ValueError(f"Mamba2Config: head_dim=None means expand * d_model / num_heads, "
                             f"but {self.expand} * {d_model} is not a multiple of {num_heads}; "
                             "give head_dim")
        return dataclasses.replace(self, head_dim=self.expand * d_model // num_heads)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("conv", "ssm"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class Mamba2Cache:
    """A Mamba-2 layer's decoding state (a pytree of constant size).

    Attributes:
      conv: ``[B, W-1, H·P + 2·G·N]`` the last conv inputs (``x', B', C'``), oldest first.
      ssm: ``lcattn.ssm.SSMState`` (float32).
    """

    conv: jax.Array
    ssm: ssm.SSMState


class Mamba2(nnx.Module):
    """Mamba-2 mixer ``[B, T, D] -> [B, T, D]`` with the DecoderLM mixer protocol.

    Parameters (float32; logical axes, ``None`` = unnamed/replicated):
      ``w_x, w_z [D, H, P]`` (``embed, heads, head_dim``), ``w_b, w_c [D, G, N]``
      (``embed, kv_heads, None``), ``w_dt [D, H]`` (``embed, heads``), conv taps
      ``conv_x [W, H, P]``, ``conv_b, conv_c [W, G, N]`` and biases, ``a_log``, ``dt_bias``,
      ``d_skip [H]`` (``heads``), ``norm [H, P]``, ``w_out [H, P, D]``
      (``heads, head_dim, embed``).

    Initialization as in Mamba-2: ``A = -exp(a_log)`` with ``-A ~ U[1, 16]``; ``Δ_bias`` so
    that ``softplus(Δ_bias) ~ logU[1e-3, 1e-1]``; ``D = 1``.
    """

    def __init__(self, d_model: int, config: Mamba2Config = Mamba2Config(head_dim=64), *,
                 rngs: nnx.Rngs):
        checks.integer("Mamba2", "d_model", d_model)
        if not isinstance(config, Mamba2Config):
            raise ValueError(f"Mamba2: `config` must be a Mamba2Config, got {config!r}")
        if config.head_dim is None:
            raise ValueError("Mamba2: `config.head_dim` is None; give it, or resolve it with "
                             "config.for_model(d_model, num_heads)")
        d_inner = config.expand * d_model
        if d_inner % config.head_dim:
            raise ValueError(f"Mamba2: expand * d_model ({d_inner}) must be a multiple of "
                             f"head_dim ({config.head_dim})")
        h, p, g, n, w = (d_inner // config.head_dim, config.head_dim, config.num_groups,
                         config.state_dim, config.conv_width)
        if h % g:
            raise ValueError(f"Mamba2: the number of heads ({h} = expand * d_model / head_dim) "
                             f"must be a multiple of num_groups ({g})")
        self.config = config
        head_axes, group_axes = ("heads", "head_dim"), ("kv_heads", None)
        self.w_x = param(rngs, fan_in(0, (1, 2)), (d_model, h, p), ("embed",) + head_axes)
        self.w_z = param(rngs, fan_in(0, (1, 2)), (d_model, h, p), ("embed",) + head_axes)
        self.w_b = param(rngs, fan_in(0, (1, 2)), (d_model, g, n), ("embed",) + group_axes)
        self.w_c = param(rngs, fan_in(0, (1, 2)), (d_model, g, n), ("embed",) + group_axes)
        self.w_dt = param(rngs, fan_in(0, 1), (d_model, h), ("embed", "heads"))
        conv = nnx.initializers.uniform(2.0 / math.sqrt(w))   # U[0, 2/√W), recentred below
        self.conv_x = param(rngs, _centred(conv, w), (w, h, p), (None,) + head_axes)
        self.conv_b = param(rngs, _centred(conv, w), (w, g, n), (None,) + group_axes)
        self.conv_c = param(rngs, _centred(conv, w), (w, g, n), (None,) + group_axes)
        zeros = nnx.initializers.zeros_init()
        self.conv_x_bias = param(rngs, zeros, (h, p), head_axes)
        self.conv_b_bias = param(rngs, zeros, (g, n), group_axes)
        self.conv_c_bias = param(rngs, zeros, (g, n), group_axes)
        self.a_log = param(rngs, _a_log_init, (h,), ("heads",))
        self.dt_bias = param(rngs, _dt_bias_init, (h,), ("heads",))
        self.d_skip = param(rngs, nnx.initializers.ones_init(), (h,), ("heads",))
        self.norm = param(rngs, nnx.initializers.ones_init(), (h, p), head_axes)
        self.w_out = param(rngs, fan_in((0, 1), 2), (h, p, d_model), head_axes + ("embed",))

    # -- pieces ----------------------------------------------------------------------------
    def _conv_params(self, dtype):
        h, p = self.w_x.shape[1:]
        g, n = self.w_b.shape[1:]
        w = self.conv_x.shape[0]
        weight = jnp.concatenate([self.conv_x[...].reshape(w, h * p),
                                  self.conv_b[...].reshape(w, g * n),
                                  self.conv_c[...].reshape(w, g * n)], axis=1)
        bias = jnp.concatenate([self.conv_x_bias[...].reshape(-1),
                                self.conv_b_bias[...].reshape(-1),
                                self.conv_c_bias[...].reshape(-1)])
        return weight.astype(dtype), bias.astype(dtype)

    def _mix(self, x, starts, cache: Mamba2Cache | None):
        """``(out [B, T, D], Mamba2Cache)`` from ``x [B, T, D]`` and an optional cache."""
        dt_ = x.dtype
        b, t, _ = x.shape
        h, p = self.w_x.shape[1:]
        g, n = self.w_b.shape[1:]
        proj = lambda w: jnp.einsum("btd,d...->bt...", x, w[...].astype(dt_))  # noqa: E731
        xbc = jnp.concatenate([proj(self.w_x).reshape(b, t, h * p),
                               proj(self.w_b).reshape(b, t, g * n),
                               proj(self.w_c).reshape(b, t, g * n)], axis=-1)
        xbc, history = ssm.causal_conv(xbc, *self._conv_params(dt_), starts=starts,
                                       history=None if cache is None else cache.conv)
        xbc = jax.nn.silu(xbc)
        xh = xbc[..., :h * p].reshape(b, t, h, p)
        bm = xbc[..., h * p:h * p + g * n].reshape(b, t, g, n)
        cm = xbc[..., h * p + g * n:].reshape(b, t, g, n)
        dt = jax.nn.softplus(proj(self.w_dt).astype(jnp.float32) + self.dt_bias[...])
        a = -jnp.exp(self.a_log[...])
        cfg = self.config
        state = None if cache is None else cache.ssm
        if t == 1 and state is not None:  # decoding: one step of the recurrence
            y, state = ssm.ssd_step(state, xh[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0],
                                    options=cfg.options)
            y = y[:, None]
        else:
            y, state = ssm.ssd(xh, dt, a, bm, cm, options=cfg.options, starts=starts,
                               state=state, impl=cfg.impl, chunk_size=cfg.chunk_size)
        y = y.astype(jnp.float32) + self.d_skip[...][:, None] * xh.astype(jnp.float32)
        gated = y * jax.nn.silu(proj(self.w_z).astype(jnp.float32))
        if cfg.gated_norm == "group":   # [B, T, G, (H/G)·P]: one statistic per group
            gated = gated.reshape(b, t, g, (h // g) * p)
        gated = gated * jax.lax.rsqrt(jnp.mean(gated * gated, axis=-1, keepdims=True)
                                      + cfg.norm_eps)
        gated = (gated.reshape(b, t, h, p) * self.norm[...]).astype(dt_)
        out = jnp.einsum("bthp,hpd->btd", gated, self.w_out[...].astype(dt_))
        return out, Mamba2Cache(history, state)

    # -- mixer protocol --------------------------------------------------------------------
    def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """``x [B, T, D] -> [B, T, D]``; no state crosses a change of ``segment_ids [B, T]``.

        ``positions`` are accepted for the mixer protocol and unused: the recurrence itself
        orders the tokens.
        """
        del positions
        sharding.check_no_context("Mamba2")
        return self._mix(x, ssm.segment_starts(segment_ids), None)[0]

    def init_cache(self, batch_size: int, max_len: int | None = None, *,
                   dtype=jnp.float32) -> Mamba2Cache:
        """The empty state; its size does not depend on ``max_len``. ``dtype`` is the conv
        history's (the SSM state is float32)."""
        del max_len
        h, p = self.w_x.shape[1:]
        g, n = self.w_b.shape[1:]
        w = self.conv_x.shape[0]
        return Mamba2Cache(
            jnp.zeros((batch_size, w - 1, h * p + 2 * g * n), dtype),
            ssm.init_state(batch_size, num_heads=h, head_dim=p, state_dim=n, num_groups=g,
                           options=self.config.options))

    def extend(self, x: jax.Array, cache: Mamba2Cache, *, positions: jax.Array | None = None):
        """Continue from ``cache`` with ``x [B, T, D]`` (prefill: the prompt; decode: ``T = 1``).

        Returns ``(y [B, T, D], cache)``. ``positions`` are unused (tokens must follow the
        cached ones in order).
        """
        del positions
        if not isinstance(cache, Mamba2Cache):
            raise ValueError(f"Mamba2.extend: `cache` must be a Mamba2Cache (from init_cache), "
                             f"got {type(cache).__name__}")
        return self._mix(x, None, cache)


def _centred(uniform, width):
    """``uniform`` shifted to ``U[-1/√W, 1/√W)``."""
    def init(key, shape, dtype=jnp.float32):
        return uniform(key, shape, dtype) - 1.0 / math.sqrt(width)
    return init


def _a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key, shape, dtype=jnp.float32, lo=1e-3, hi=1e-1):
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(lo), math.log(hi)))
    return dt + jnp.log(-jnp.expm1(-dt))   # softplus^{-1}(dt)
