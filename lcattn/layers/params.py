"""``param``: a float32 ``nnx.Param`` carrying logical axis names (see ``lcattn.layers``)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, init, shape: tuple, names: tuple) -> nnx.Param:
    """``init(rngs.params(), shape)`` in float32, with ``names`` (one logical axis name or None
    per dimension) as unapplied ``out_sharding`` metadata: building needs no mesh."""
    init = nnx.with_partitioning(init, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, jnp.float32))


def fan_in(in_axis, out_axis):
    """Truncated-normal ``variance_scaling(1, "fan_in")`` over the given input/output axes."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                             in_axis=in_axis, out_axis=out_axis)
