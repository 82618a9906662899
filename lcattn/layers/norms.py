"""RMSNorm (Zhang & Sennrich, 2019): ``y = x / sqrt(mean(x^2) + eps) * scale``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis of ``x [..., dim]``.

    The statistic and the scaling are computed in float32; the result has ``x``'s dtype.
    ``scale`` (``[dim]``, logical axis ``norm``) starts at one.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; accepted so every layer is built the same way
        self.eps = eps
        init = nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",),
                                     eager_sharding=False)
        self.scale = nnx.Param(init(jax.random.key(0), (dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * inv * self.scale[...].astype(jnp.float32)).astype(x.dtype)
