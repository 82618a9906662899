"""SwiGLU feed-forward block (Shazeer, 2020): ``W_down (silu(x W_gate) * (x W_up))``."""
from __future__ import annotations

import jax
from flax import nnx

from lcattn.layers.params import param


class SwiGLU(nnx.Module):
    """``[..., d_model] -> [..., d_model]`` through a gated hidden layer of ``mlp_dim``.

    Parameters (float32, cast to the input dtype when applied): ``w_gate``, ``w_up``
    ``[d_model, mlp_dim]`` (axes ``embed, mlp``) and ``w_down`` ``[mlp_dim, d_model]``
    (axes ``mlp, embed``); no biases.
    """

    def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.w_gate = param(rngs, init, (d_model, mlp_dim), ("embed", "mlp"))
        self.w_up = param(rngs, init, (d_model, mlp_dim), ("embed", "mlp"))
        self.w_down = param(rngs, init, (mlp_dim, d_model), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate = jax.nn.silu(x @ self.w_gate[...].astype(dt))
        return (gate * (x @ self.w_up[...].astype(dt))) @ self.w_down[...].astype(dt)
