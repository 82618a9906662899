"""Flax NNX layers: thin parameter holders around lcattn's pure functions.

* ``RMSNorm(dim, eps=1e-6)`` -- ``lcattn.layers.norms``
* ``SwiGLU(d_model, mlp_dim)`` -- ``lcattn.layers.mlp``
* ``Attention(d_model, num_heads, num_kv_heads, head_dim, spec)`` and its ``KVCache`` --
  ``lcattn.layers.attention``
* ``Mamba2(d_model, Mamba2Config(...))`` and its ``Mamba2Cache`` -- ``lcattn.layers.mamba2``

Every parameter is float32 and carries *logical* axis names (``None`` for the few axes that
are never sharded: Mamba-2's conv taps and state width) as ``out_sharding`` metadata
(created with ``nnx.with_partitioning(..., eager_sharding=False)``, so building a model needs
no mesh). A sharding layer maps them to mesh axes without touching the layers, e.g.
``with flax.linen.logical_axis_rules(rules): nnx.get_partition_spec(nnx.state(model))``.

==========  ==========================================================================
name        axis
==========  ==========================================================================
embed       model width ``d_model`` (residual stream)
heads       query heads (``wq`` axis 1, ``wo`` axis 0)
kv_heads    key/value heads under GQA (``wk``, ``wv`` axis 1)
head_dim    per-head width
mlp         SwiGLU hidden width
vocab       vocabulary (embedding table axis 0, untied head axis 1)
norm        RMSNorm scale
==========  ==========================================================================
"""
from lcattn.layers.attention import Attention, KVCache
from lcattn.layers.mamba2 import Mamba2, Mamba2Cache, Mamba2Config
from lcattn.layers.mlp import SwiGLU
from lcattn.layers.norms import RMSNorm

LOGICAL_AXES = ("embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "norm")

__all__ = ["Attention", "KVCache", "Mamba2", "Mamba2Cache", "Mamba2Config", "RMSNorm", "SwiGLU",
           "LOGICAL_AXES"]
