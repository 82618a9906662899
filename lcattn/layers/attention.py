"""Grouped-query attention layer and its KV cache.

``Attention`` projects ``x [B, T, D]`` to ``q [B, T, Hq, Dh]`` and ``k, v [B, T, Hkv, Dh]``
(query head ``h`` reads kv head ``h // (Hq // Hkv)``), calls ``lcattn.attend`` with q and k
*unrotated* (``attend`` applies RoPE / ALiBi and LM-Infinite's distance limit itself) and
projects back with ``wo``. Optional biases: ``qkv_bias`` on the q/k/v projections (Qwen2,
Llama's ``attention_bias``) and ``out_bias`` on ``wo`` (Llama's ``attention_bias``).

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

Under a mesh with ``context > 1`` (``jax.set_mesh``), either layout is split over ``context``
along its slots (``init_cache`` rounds the slot count up to a multiple of the context size)
and ``extend`` decodes against it without gathering it: each device attends to its slots and
the parts merge by log-sum-exp (``lcattn.attend(..., context_strategy="kv_shards")``).
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

    def write(self, positions: jax.Array, k: jax.Array, v: jax.Array, *,
              context_axis: str | None = None) -> "KVCache":
        """Store keys/values ``[B, T, Hkv, Dh]`` at distinct positions ``int32 [B, T]``.

        In the ring only the sinks and the newest ``window`` positions of the call are written
        (older ones could never be seen again); full-layout positions ``>= S`` are dropped.
        ``context_axis``: inside ``jax.shard_map``, this cache is this device's part of one
        whose ``n * S`` slots are split contiguously over that mesh axis; ``positions``,
        ``k``, ``v`` are the same on every device and each device writes the slots it holds.
        """
        local, parts, offset = self.size, 1, 0
        if context_axis is not None:
            parts = jax.lax.axis_size(context_axis)
            offset = jax.lax.axis_index(context_axis) * local
        size = local * parts
        if self.window is None:
            slot = positions
        else:
            g, w = self.n_global, self.window
            newest = jnp.max(positions, axis=1, keepdims=True)
            ring = g + (positions - g) % w
            slot = jnp.where(positions < g, positions,
                             jnp.where(positions > newest - w, ring, size))
        slot = jnp.where((slot >= 0) & (slot < size), slot - offset, local)
        slot = jnp.where((slot >= 0) & (slot < local), slot, local)  # `local`: dropped
        rows = jnp.arange(positions.shape[0])[:, None]

        def put(buf, new):
            return buf.at[rows, slot].set(new.astype(buf.dtype), mode="drop")

        return dataclasses.replace(
            self, k=put(self.k, k), v=put(self.v, v), positions=put(self.positions, positions),
            segment=put(self.segment, jnp.ones_like(positions)))

    def context_split(self) -> "KVCache":
        """This cache with its slots split over the current mesh's ``context`` axis
        (``lcattn.sharding.context_split``; unchanged without one)."""
        return dataclasses.replace(self, **{name: sharding.context_split(getattr(self, name))
                                            for name in ("k", "v", "positions", "segment")})


class Attention(nnx.Module):
    """Grouped-query attention with an ``AttentionSpec``.

    Parameters (float32, cast to the input dtype when applied):
      ``wq [d_model, num_heads, head_dim]`` (``embed, heads, head_dim``),
      ``wk``, ``wv [d_model, num_kv_heads, head_dim]`` (``embed, kv_heads, head_dim``),
      ``wo [num_heads, head_dim, d_model]`` (``heads, head_dim, embed``);
      with ``qkv_bias``: ``bq [num_heads, head_dim]``, ``bk``, ``bv [num_kv_heads, head_dim]``;
      with ``out_bias``: ``bo [d_model]`` (``embed``). Biases start at zero.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 spec: AttentionSpec | None = None, *, rngs: nnx.Rngs, backend: str = "auto",
                 qkv_bias: bool = False, out_bias: bool = False):
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
        zeros = nnx.initializers.zeros_init()
        bias = lambda shape, names, on: param(rngs, zeros, shape, names) if on else None  # noqa: E731
        self.bq = bias((num_heads, head_dim), q_names[1:], qkv_bias)
        self.bk = bias((num_kv_heads, head_dim), kv_names[1:], qkv_bias)
        self.bv = bias((num_kv_heads, head_dim), kv_names[1:], qkv_bias)
        self.bo = bias((d_model,), ("embed",), out_bias)

    def _qkv(self, x):
        dt = x.dtype
        return tuple(_plus(jnp.einsum("btd,dhk->bthk", x, w[...].astype(dt)), bias)
                     for w, bias in ((self.wq, self.bq), (self.wk, self.bk), (self.wv, self.bv)))

    def _out(self, o):
        return _plus(jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(o.dtype)), self.bo)

    def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, spec: SpecOverride = None,
                 backend: str | None = None, context_layout: str = "contiguous") -> jax.Array:
        """``x [B, T, D] -> [B, T, D]``.

        Args:
          positions: ``int32 [B, T]`` absolute positions (None: ``arange(T)``).
          segment_ids: ``int32 [B, T]`` or None; tokens attend only within their segment.
          spec: evaluation-time override of the layer's spec (an AttentionSpec or a callable
            ``spec -> spec``).
          backend: overrides the layer's ``backend``.

        When the current mesh (``jax.set_mesh``) has ``context > 1``, the sequence is split
        over it and attention runs as a ring (``lcattn.backends.ring``): ``context_layout``
        says which tokens each device holds (``"zigzag"``: ``x`` is in the order of
        ``ring_plan.layout_order`` and ``positions`` are the tokens' own, so required).
        """
        q, k, v = self._qkv(x)
        spec, backend = resolve_spec(self.spec, spec), backend or self.backend
        if sharding.axis_size("context") == 1:
            out = attend(q, k, v, spec, q_positions=positions, k_positions=positions,
                         q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                         backend=backend)
        else:  # the sequence is sharded over the mesh axis `context`: ring attention
            if positions is None and context_layout != "contiguous":
                raise ValueError(f"context_layout={context_layout!r} needs `positions` (the "
                                 "reordered tokens' own; lcattn.backends.ring_plan.layout_order)")
            positions = broadcast_positions("positions", positions, *x.shape[:2])
            out = sharding.context_parallel(
                lambda q, k, v, p, s: attend(q, k, v, spec, q_positions=p, k_positions=p,
                                             q_segment_ids=s, kv_segment_ids=s,
                                             backend=backend, context_axis="context",
                                             context_layout=context_layout),
                q, k, v, positions, segment_ids)
        return self._out(out)

    def init_cache(self, batch_size: int, max_len: int, *, spec: SpecOverride = None,
                   dtype=jnp.float32) -> KVCache:
        """An empty cache for positions ``< max_len``; a ring when the (overridden) mask allows.

        When the current mesh (``jax.set_mesh``) has ``context > 1``, the slot count is
        rounded up to a multiple of the context size (the extra slots stay empty, or hold
        positions ``>= max_len``) and the cache is split over ``context`` along its slots.
        """
        layout = ring_layout(resolve_spec(self.spec, spec).mask)
        window, n_global, size = None, 0, max_len
        if layout is not None and sum(layout) < max_len:
            (window, n_global), size = layout, sum(layout)
        parts = sharding.axis_size("context")
        size = -(-size // parts) * parts
        shape = (batch_size, size, self.num_kv_heads, self.head_dim)
        positions = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (batch_size, size))
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), positions,
                       jnp.zeros((batch_size, size), jnp.int32), window,
                       n_global).context_split()

    def extend(self, x: jax.Array, cache: KVCache, *, positions: jax.Array,
               spec: SpecOverride = None, backend: str | None = None):
        """Attend ``x [B, T, D]`` at ``positions int32 [B, T]`` over the cache plus itself.

        Returns ``(y [B, T, D], cache)`` with the new keys written. Prefill is one call with
        the prompt, a decode step one call with ``T = 1``; positions must be distinct and
        later than those already cached.

        When the current mesh (``jax.set_mesh``) has ``context > 1``, the cache is split over
        ``context`` along its slots (its size must be a multiple of the context size, as
        ``init_cache`` makes it under that mesh) and stays split: ``x`` and the new keys are
        whole on every device, each device attends to its part of the cache (the new keys
        count on the first device only) and the parts merge across devices with the
        normalizer's log-sum-exp merge (``context_strategy="kv_shards"``); each device writes
        the new keys that fall in its slots.
        """
        spec = resolve_spec(self.spec, spec)
        backend = backend or self.backend
        if cache.window is not None:
            layout = ring_layout(spec.mask)
            if layout is None or layout[0] > cache.window or layout[1] > cache.n_global:
                raise ValueError(
                    f"this cache is a ring for Lambda(window={cache.window}, "
                    f"n_global={cache.n_global}) but the layer attends with mask={spec.mask!r}; "
                    "build the cache with the same attention_override")
        q, k, v = self._qkv(x)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        parts = sharding.axis_size("context")
        if parts == 1:
            out = _attend_cache(q, k, v, cache, positions, spec, backend, None)
            return self._out(out), cache.write(positions, k, v)
        if cache.size % parts:
            raise ValueError(f"the KV cache has {cache.size} slots, which the mesh axis "
                             f"'context' (size {parts}) does not divide; build the cache with "
                             f"init_cache under the same mesh (it rounds the slots up to a "
                             f"multiple of the context size)")

        def per_device(new, cache):
            q, k, v, positions = new
            out = _attend_cache(q, k, v, cache, positions, spec, backend, "context")
            return out, cache.write(positions, k, v, context_axis="context")

        out, cache = sharding.kv_shards(per_device, (q, k, v, positions), cache)
        return self._out(out), cache.context_split()


def _plus(x, bias):
    """``x + bias`` (in ``x``'s dtype), or ``x`` when ``bias`` is None."""
    return x if bias is None else x + bias[...].astype(x.dtype)


def _attend_cache(q, k, v, cache: KVCache, positions, spec, backend, context_axis):
    """``attend`` of ``q [B, T, Hq, Dh]`` over ``cache`` plus the new keys ``k, v``.

    ``context_axis``: inside ``jax.shard_map``, ``cache`` is this device's part of a cache
    split over that axis and ``q``, ``k``, ``v``, ``positions`` are whole; the new keys are
    valid on the axis' first device only, so each counts once when the parts merge.
    """
    ones = jnp.ones(positions.shape, jnp.int32)
    new_seg, extra = ones, {}
    if context_axis is not None:
        new_seg = jnp.where(jax.lax.axis_index(context_axis) == 0, ones, 0)
        extra = dict(context_axis=context_axis, context_strategy="kv_shards")
    return attend(q, jnp.concatenate([cache.k, k], axis=1),
                  jnp.concatenate([cache.v, v], axis=1), spec, q_positions=positions,
                  k_positions=jnp.concatenate([cache.positions, positions], axis=1),
                  q_segment_ids=ones, kv_segment_ids=jnp.concatenate([cache.segment, new_seg],
                                                                    axis=1),
                  backend=backend, **extra)
