"""Grouped-query attention layer and its KV cache.

``Attention`` projects ``x [B, T, D]`` to ``q [B, T, Hq, Dh]`` and ``k, v [B, T, Hkv, Dh]``
(query head ``h`` reads kv head ``h // (Hq // Hkv)``), calls ``lcattn.attend`` with q and k
*unrotated* (``attend`` applies RoPE / ALiBi and LM-Infinite's distance limit itself) and
projects back with ``wo``. No biases.

``KVCache`` stores keys unrotated together with their absolute positions, so a cached key is
scored exactly as in the full forward pass under any mask, position encoding or distance
limit. A slot holds one key; ``segment`` is 1 for filled slots and 0 for empty ones, and the
attention over the cache passes ``kv_segment_ids=segment`` with query segment 1, so empty
slots are never visible (and LSSA's visible-key count ``N_i`` is right). Two layouts:

* full: ``max_len`` slots, slot = position (positions must be ``< max_len``);
* ring, when every key a query at ``p`` can see is a sink (``k < n_global``) or lies in
  ``(p - window, p]`` -- ``Lambda(window, n_global)``, or ``Local(window)`` with
  ``n_global = 0``: ``n_global + window`` slots whatever ``max_len`` is; position ``p`` goes to
  slot ``p`` if ``p < n_global`` else ``n_global + (p - n_global) % window``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Union

import jax
import jax.numpy as jnp
from flax import nnx

from lcattn import backends, checks, sharding
from lcattn import masks as masks_lib
from lcattn.attention import AttentionSpec, attend
from lcattn.layers.params import fan_in, param
from lcattn.positions import broadcast as broadcast_positions

SpecOverride = Union[None, AttentionSpec, Callable[[AttentionSpec], AttentionSpec]]


def resolve_spec(spec: AttentionSpec, override: SpecOverride) -> AttentionSpec:
    """The spec a layer runs: ``spec``, or ``override`` (an AttentionSpec replaces it, a callable
    returns ``override(spec)``)."""
    if override is None:
        return spec
    if isinstance(override, AttentionSpec):
        return override
    if callable(override):
        out = override(spec)
        if not isinstance(out, AttentionSpec):
            raise ValueError(f"attention override {override!r} must return an AttentionSpec, "
                             f"got {out!r}")
        return out
    raise ValueError("attention override must be None, an AttentionSpec or a callable "
                     f"AttentionSpec -> AttentionSpec, got {override!r}")


def ring_layout(mask: masks_lib.Mask) -> tuple[int, int] | None:
    """``(window, n_global)`` if ``mask`` shows only sinks and the last ``window`` keys."""
    if isinstance(mask, masks_lib.Lambda):
        return mask.window, mask.n_global
    if isinstance(mask, masks_lib.Local):
        return mask.window, 0
    return None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("k", "v", "positions", "segment"),
                   meta_fields=("window", "n_global"))
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One attention layer's cache (a pytree; ``window`` / ``n_global`` are static).

    Attributes:
      k, v: ``[B, S, Hkv, Dh]`` unrotated keys and values.
      positions: ``int32 [B, S]`` absolute position of each slot's key.
      segment: ``int32 [B, S]``: 1 filled, 0 empty.
      window, n_global: the ring layout (``S = n_global + window``); ``window=None`` is the
        full layout (slot = position).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment: jax.Array
    window: int | None = None
    n_global: int = 0

    @property
    def size(self) -> int:
        return self.k.shape[1]

    def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> "KVCache":
        """Store keys/values ``[B, T, Hkv, Dh]`` at distinct positions ``int32 [B, T]``.

        In the ring only the sinks and the newest ``window`` positions of the call are written
        (older ones could never be seen again); full-layout positions ``>= S`` are dropped.
        """
        size = self.size
        if self.window is None:
            slot = positions
        else:
            g, w = self.n_global, self.window
            newest = jnp.max(positions, axis=1, keepdims=True)
            ring = g + (positions - g) % w
            slot = jnp.where(positions < g, positions,
                             jnp.where(positions > newest - w, ring, size))
        slot = jnp.where((slot >= 0) & (slot < size), slot, size)  # `size`: dropped
        rows = jnp.arange(positions.shape[0])[:, None]

        def put(buf, new):
            return buf.at[rows, slot].set(new.astype(buf.dtype), mode="drop")

        return dataclasses.replace(
            self, k=put(self.k, k), v=put(self.v, v), positions=put(self.positions, positions),
            segment=put(self.segment, jnp.ones_like(positions)))


class Attention(nnx.Module):
    """Grouped-query attention with an ``AttentionSpec``.

    Parameters (float32, cast to the input dtype when applied):
      ``wq [d_model, num_heads, head_dim]`` (``embed, heads, head_dim``),
      ``wk``, ``wv [d_model, num_kv_heads, head_dim]`` (``embed, kv_heads, head_dim``),
      ``wo [num_heads, head_dim, d_model]`` (``heads, head_dim, embed``).
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 spec: AttentionSpec | None = None, *, rngs: nnx.Rngs, backend: str = "auto"):
        for name, value in (("d_model", d_model), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            checks.integer("Attention", name, value)
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        spec = AttentionSpec() if spec is None else spec
        if not isinstance(spec, AttentionSpec):
            raise ValueError(f"Attention: `spec` must be an AttentionSpec, got {spec!r}")
        backends.check_name(backend, "Attention")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.spec, self.backend = spec, backend
        q_names, kv_names = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        self.wq = param(rngs, fan_in(0, (1, 2)), (d_model, num_heads, head_dim), q_names)
        self.wk = param(rngs, fan_in(0, (1, 2)), (d_model, num_kv_heads, head_dim), kv_names)
        self.wv = param(rngs, fan_in(0, (1, 2)), (d_model, num_kv_heads, head_dim), kv_names)
        self.wo = param(rngs, fan_in((0, 1), 2), (num_heads, head_dim, d_model),
                        ("heads", "head_dim", "embed"))

    def _qkv(self, x):
        dt = x.dtype
        return tuple(jnp.einsum("btd,dhk->bthk", x, w[...].astype(dt))
                     for w in (self.wq, self.wk, self.wv))

    def _out(self, o):
        return jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(o.dtype))

    def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, spec: SpecOverride = None,
                 backend: str | None = None) -> jax.Array:
        """``x [B, T, D] -> [B, T, D]``.

        Args:
          positions: ``int32 [B, T]`` absolute positions (None: ``arange(T)``).
          segment_ids: ``int32 [B, T]`` or None; tokens attend only within their segment.
          spec: evaluation-time override of the layer's spec (an AttentionSpec or a callable
            ``spec -> spec``).
          backend: overrides the layer's ``backend``.

        When the current mesh (``jax.set_mesh``) has ``context > 1``, the sequence is split
        over it and attention runs as a ring (``lcattn.backends.ring``, contiguous layout).
        """
        q, k, v = self._qkv(x)
        spec, backend = resolve_spec(self.spec, spec), backend or self.backend
        if sharding.axis_size("context") == 1:
            out = attend(q, k, v, spec, q_positions=positions, k_positions=positions,
                         q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                         backend=backend)
        else:  # the sequence is sharded over the mesh axis `context`: ring attention
            positions = broadcast_positions("positions", positions, *x.shape[:2])
            out = sharding.context_parallel(
                lambda q, k, v, p, s: attend(q, k, v, spec, q_positions=p, k_positions=p,
                                             q_segment_ids=s, kv_segment_ids=s,
                                             backend=backend, context_axis="context"),
                q, k, v, positions, segment_ids)
        return self._out(out)

    def init_cache(self, batch_size: int, max_len: int, *, spec: SpecOverride = None,
                   dtype=jnp.float32) -> KVCache:
        """An empty cache for positions ``< max_len``; a ring when the (overridden) mask allows."""
        layout = ring_layout(resolve_spec(self.spec, spec).mask)
        window, n_global, size = None, 0, max_len
        if layout is not None and sum(layout) < max_len:
            (window, n_global), size = layout, sum(layout)
        shape = (batch_size, size, self.num_kv_heads, self.head_dim)
        positions = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch_size, size))
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), positions,
                       jnp.zeros((batch_size, size), jnp.int32), window, n_global)

    def extend(self, x: jax.Array, cache: KVCache, *, positions: jax.Array,
               spec: SpecOverride = None, backend: str | None = None):
        """Attend ``x [B, T, D]`` at ``positions int32 [B, T]`` over the cache plus itself.

        Returns ``(y [B, T, D], cache)`` with the new keys written. Prefill is one call with
        the prompt, a decode step one call with ``T = 1``; positions must be distinct and
        later than those already cached.
        """
        spec = resolve_spec(self.spec, spec)
        if cache.window is not None:
            layout = ring_layout(spec.mask)
            if layout is None or layout[0] > cache.window or layout[1] > cache.n_global:
                raise ValueError(
                    f"this cache is a ring for Lambda(window={cache.window}, "
                    f"n_global={cache.n_global}) but the layer attends with mask={spec.mask!r}; "
                    "build the cache with the same attention_override")
        q, k, v = self._qkv(x)
        ones = jnp.ones(positions.shape, jnp.int32)
        k_all = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
        v_all = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
        out = attend(q, k_all, v_all, spec, q_positions=positions,
                     k_positions=jnp.concatenate([cache.positions, positions], axis=1),
                     q_segment_ids=ones,
                     kv_segment_ids=jnp.concatenate([cache.segment, ones], axis=1),
                     backend=backend or self.backend)
        return self._out(out), cache.write(positions, k, v)
