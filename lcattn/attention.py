"""``attend``: one attention call over masks x normalizers x positions x backends.

Layout ``[batch, seq, heads, head_dim]``; ``k``/``v`` may have fewer heads than ``q`` (GQA,
query head ``h`` reads kv head ``h // (Hq // Hkv)``). q and k go in unrotated: ``attend``
applies the position encoding, because LM-Infinite's distance limit scores the same pair two
ways. Positions are absolute (``int32 [batch, seq]``, default ``arange``), so masks stay right
under KV caches, ring shards and packing; segment ids add ``q_seg == kv_seg`` to the mask.

Streaming backends (``xla`` and the Pallas kernels) implement one *pass*: ``(out, lse)`` of an
online softmax over the normalizer's log-weights for one mask. This module runs the passes
(LSSAR needs two), the visible-key count of LSSA, and LM-Infinite's two branches, joined with
the normalizer's ``merge``:

* local branch: ``mask & Local(window)`` at the true positions;
* sink branch: ``mask & Beyond(window)`` with q encoded at position ``D`` and k at 0, i.e.
  score ``q_i^T R(D) k_j`` (ALiBi: bias ``-m_h D``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcattn import backends, checks, sharding
from lcattn import masks as masks_lib
from lcattn import normalizers as norms_lib
from lcattn import positions as pos_lib
from pallas_kernels.block_sizes import BlockSizes

CONTEXT_STRATEGIES = ("ring", "all_gather", "kv_shards")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What an attention layer computes: mask, normalizer, position encoding, distance limit.

    ``distance_limit=D`` (LM-Infinite) needs ``mask=Lambda(window, n_global)``: visible keys at
    distance ``>= window`` are scored as if at distance ``D``.
    """

    mask: masks_lib.Mask = masks_lib.Causal()
    normalizer: norms_lib.Normalizer = norms_lib.Softmax()
    position: pos_lib.Position = pos_lib.RoPE()
    distance_limit: int | None = None

    def __post_init__(self):
        for name, value, kind in (("mask", self.mask, masks_lib.Mask),
                                  ("normalizer", self.normalizer, norms_lib.Normalizer),
                                  ("position", self.position, pos_lib.Position)):
            if not isinstance(value, kind):
                raise ValueError(f"AttentionSpec: `{name}` must be a {kind.__module__}."
                                 f"{kind.__name__}, got {value!r}")
        checks.integer("AttentionSpec", "distance_limit", self.distance_limit, allow_none=True)
        if self.distance_limit is not None:
            if not isinstance(self.mask, masks_lib.Lambda):
                raise ValueError("AttentionSpec: `distance_limit` requires mask=Lambda(window, "
                                 f"n_global) (LM-Infinite), got mask={self.mask!r}")

    def branches(self, q_pos, k_pos):
        """``[(mask, q_enc_pos, k_enc_pos)]``: one branch, or LM-Infinite's local and sink
        branches."""
        if self.distance_limit is None:
            return [(self.mask, q_pos, k_pos)]
        w = self.mask.window
        return [(self.mask & masks_lib.Local(w), q_pos, k_pos),
                (self.mask & masks_lib.Beyond(w), jnp.full_like(q_pos, self.distance_limit),
                 jnp.zeros_like(k_pos))]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Validated position / segment arrays (``int32 [B, T]``; segments may be None)."""

    q_pos: jax.Array | np.ndarray
    k_pos: jax.Array | np.ndarray
    q_seg: jax.Array | None
    kv_seg: jax.Array | None
    default_k_pos: bool
    num_keys: int | None = None  # keys at positions 0..num_keys-1 (default: the k length)


def validate(q, k, v, q_positions, k_positions, q_segment_ids, kv_segment_ids) -> Inputs:
    """Shape / dtype checks with messages that name the argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"`{name}` must be [batch, seq, heads, head_dim], got shape "
                             f"{jnp.shape(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"`{name}` must be a floating dtype, got {x.dtype}")
    (b, tq, hq, d), (bk, tk, hk, dk), (bv, tv, hv, _) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {bv}")
    if tk != tv or hk != hv:
        raise ValueError(f"`k` {k.shape} and `v` {v.shape} must agree on seq and heads")
    if d != dk:
        raise ValueError(f"`q` head_dim {d} != `k` head_dim {dk}")
    if min(tq, tk) < 1:
        raise ValueError(f"sequences must be non-empty, got q seq {tq}, k seq {tk}")
    if hq % hk:
        raise ValueError(f"GQA: query heads ({hq}) must be a multiple of kv heads ({hk})")
    segs = (q_segment_ids, kv_segment_ids)
    if (segs[0] is None) != (segs[1] is None):
        raise ValueError("`q_segment_ids` and `kv_segment_ids` must be given together")
    q_seg = None if segs[0] is None else jnp.asarray(
        pos_lib.broadcast("q_segment_ids", segs[0], b, tq))
    kv_seg = None if segs[1] is None else jnp.asarray(
        pos_lib.broadcast("kv_segment_ids", segs[1], b, tk))
    return Inputs(pos_lib.broadcast("q_positions", q_positions, b, tq),
                  pos_lib.broadcast("k_positions", k_positions, b, tk), q_seg, kv_seg,
                  k_positions is None)


def _visible_counts(pass_fn, q, k, spec, inp: Inputs):
    """``N_i`` as float32 ``[B, Tq]``: analytic for default key positions, else a counting pass."""
    tk = inp.num_keys or k.shape[1]
    if inp.default_k_pos and inp.q_seg is None:
        return jnp.asarray(spec.mask.count(inp.q_pos, 0, tk - 1), jnp.float32)
    ones = jnp.zeros(q.shape[:2] + (1,), jnp.float32)
    ctx = {"count": ones, "q_pos": ones, "lse": ones}
    _, lse = pass_fn(q[:, :, :1], k[:, :, :1], None, ctx, inp.q_pos, inp.k_pos, inp.q_seg,
                     inp.kv_seg, None, mask=spec.mask, normalizer=norms_lib.VisibleCount(),
                     pass_idx=0)
    return jnp.round(jnp.exp(jax.lax.stop_gradient(lse[..., 0])))


def streaming_attend(pass_fn: Callable, q, k, v, spec: AttentionSpec, inp: Inputs):
    """Run ``spec`` with a streaming backend's ``pass_fn``; returns ``[B, Tq, Hq, Dv]``.

    ``pass_fn(q, k, v|None, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer,
    pass_idx) -> (out [B,Tq,Hq,Dv] f32 | None, lse [B,Tq,Hq])`` with prepared (rotated,
    scaled) ``q``/``k``, ``ctx`` a dict of ``[B, Tq, Hq]`` float32 row arrays and ``bias``
    None or ``(q_bias_pos, k_bias_pos, slopes [Hq])`` for ALiBi.
    """
    norm = spec.normalizer
    b, tq, hq, _ = q.shape
    rows = (b, tq, hq)
    q_pos_f = jnp.broadcast_to(jnp.asarray(inp.q_pos, jnp.float32)[..., None], rows)
    ctx = {"count": jnp.ones(rows, jnp.float32), "q_pos": q_pos_f,
           "lse": jnp.zeros(rows, jnp.float32)}
    ctx = sharding.varying_like(ctx, q)  # inside shard_map: per-device, like q
    log_count = jnp.zeros((b, tq, 1), jnp.float32)
    if norm.needs_count:
        count = _visible_counts(pass_fn, q, k, spec, inp)
        ctx["count"] = sharding.varying_like(jnp.broadcast_to(count[..., None], rows), q)
        log_count = jnp.log(jnp.maximum(count, 1.0))[..., None]
    slopes = spec.position.slopes(hq)
    branches = []
    length = pos_lib.rotation_length(inp.q_pos)  # the queries' own, for both rotations
    for mask, qe, ke in spec.branches(inp.q_pos, inp.k_pos):
        qb, kb = norm.prepare(spec.position.rotate(q, qe, length),
                              spec.position.rotate(k, ke, length), log_count)
        bias = None if slopes is None else (qe, ke, slopes)
        branches.append((mask, qb, kb, bias))  # float32: LSSAR's power amplifies rounding
    out = None
    for pass_idx in range(norm.num_passes):
        vp = v if norm.uses_values(pass_idx) else None
        state = None
        for mask, qb, kb, bias in branches:
            o, lse = pass_fn(qb, kb, vp, ctx, inp.q_pos, inp.k_pos, inp.q_seg, inp.kv_seg, bias,
                             mask=mask, normalizer=norm, pass_idx=pass_idx)
            part = norm.from_result(o, lse)
            state = part if state is None else norm.merge(state, part)
        out, ctx["lse"] = norm.finalize(state)
    return out.astype(q.dtype)


def attend(q, k, v, spec: AttentionSpec, *, q_positions=None, k_positions=None,
           q_segment_ids=None, kv_segment_ids=None, backend: str = "auto", interpret=None,
           block_sizes: BlockSizes | tuple[int, int] | None = None,
           context_axis: str | None = None, context_layout: str = "contiguous",
           context_strategy: str = "ring"):
    """Attention ``[B, Tq, Hq, D] x [B, Tk, Hkv, D] x [B, Tk, Hkv, Dv] -> [B, Tq, Hq, Dv]``.

    Args:
      spec: mask, normalizer, position encoding and distance limit.
      q_positions, k_positions: absolute positions ``int32 [B, T]`` (or ``[T]``); default
        ``arange(T)`` for both (pass positions explicitly when decoding against a cache).
      q_segment_ids, kv_segment_ids: optional ``int32 [B, T]``; keys are visible only within
        the query's segment (packing).
      backend: a name from ``lcattn.backends``: ``"reference"`` (dense oracle), ``"xla"``
        (blockwise, skips empty tiles), ``"pallas_tpu"`` (Mosaic TPU block-sparse kernels),
        ``"pallas_gpu"`` (Mosaic GPU forward, dQ and dK/dV kernels for sm_90a, bf16 operands;
        LSSAR's ``QKᵀ`` from split float32 operands; on other GPUs it runs
        ``"pallas_triton"``), ``"pallas_triton"`` (Pallas Triton forward, dQ and dK/dV
        kernels for any GPU from sm_80),
        ``"cudnn"`` (jax's cuDNN attention, for the specs it expresses), or ``"auto"``
        (``lcattn.backends.AUTO``: ``xla`` on every platform today).
      interpret: for Pallas backends: run in interpret mode; None = when not on their
        platform. Ignored by ``reference`` and ``xla``.
      block_sizes: tiles of blockwise backends: a ``pallas_kernels.block_sizes.BlockSizes``
        (forward and backward sizes), a ``(block_q, block_k)`` pair, or None (512 x 512).
      context_axis: inside ``jax.shard_map``, the mesh axis the sequence is sharded over: q,
        k, v (and positions, segment ids) are this device's shard and attention runs as a
        ring (``lcattn.backends.ring``) around the backend's pass. Positions default to the
        layout's global positions; given positions must be global too (a shard's local
        ``arange`` would be wrong, and cannot be detected inside ``jit``).
      context_layout: which tokens each device holds (``lcattn.backends.ring_plan``):
        ``"contiguous"`` (Local / Λ) or ``"zigzag"`` (Causal / Full: balanced work).
      context_strategy: ``"ring"`` (send what the mask needs), ``"all_gather"`` (gather
        every key on every device; for comparison) or ``"kv_shards"`` (decoding against a KV
        cache sharded over the axis: q, any length, is the same on every device, k / v /
        ``k_positions`` are this device's part of the cache; each device attends to its part
        and the results merge across devices with the normalizers' log-sum-exp merge).
    """
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"`spec` must be an AttentionSpec, got {spec!r}")
    impl = backends.resolve_backend(backend, spec)
    if context_axis is not None:
        checks.choice("attend", "context_strategy", context_strategy, CONTEXT_STRATEGIES)
        return _ring_attend(impl, q, k, v, spec, q_positions, k_positions, q_segment_ids,
                            kv_segment_ids, interpret, block_sizes, context_axis, context_layout,
                            context_strategy)
    inp = validate(q, k, v, q_positions, k_positions, q_segment_ids, kv_segment_ids)
    if not impl.streaming:
        return impl.load().attend(q, k, v, spec, inp)
    pass_fn = impl.load().pass_fn(BlockSizes.of(block_sizes), interpret)
    return streaming_attend(pass_fn, q, k, v, spec, inp)


def _ring_attend(impl, q, k, v, spec, q_positions, k_positions, q_segment_ids, kv_segment_ids,
                 interpret, block_sizes, axis, layout, strategy):
    from lcattn.backends import ring

    try:
        n = jax.lax.axis_size(axis)
    except NameError as err:
        raise ValueError(f"context_axis={axis!r}: attend must run inside jax.shard_map over a "
                         f"mesh with that axis (the sequence sharded on it)") from err
    if not impl.streaming:
        raise ValueError(f"context_axis: backend {impl.name!r} is dense; ring attention runs "
                         f"a streaming backend's pass ({backends.streaming_names()})")
    local = impl.load().pass_fn(BlockSizes.of(block_sizes), interpret)
    if strategy == "kv_shards":
        if q_positions is None or k_positions is None:
            raise ValueError("context_strategy='kv_shards': give q_positions and k_positions "
                             "(global positions of the queries and of this device's keys)")
        inp = validate(q, k, v, q_positions, k_positions, q_segment_ids, kv_segment_ids)
        return streaming_attend(ring.kv_shards_pass_fn(local, axis), q, k, v, spec, inp)
    if isinstance(getattr(spec.position, "scaling", None), pos_lib.DynamicNTK):
        raise ValueError(f"context_axis={axis!r}: RoPE scaling DynamicNTK rescales with the "
                         f"sequence length max(q_positions) + 1, but under "
                         f"context_strategy={strategy!r} each device sees only its shard's "
                         f"positions; use a static scaling (NTK, YaRN, Llama3), attend without "
                         f"context_axis, or context_strategy='kv_shards' (queries on every "
                         f"device)")
    if q.shape[1] != k.shape[1] or (q_positions is None) != (k_positions is None):
        raise ValueError(f"context_axis: ring attention is self-attention over the sharded "
                         f"sequence: q and k need the same local length (got {q.shape[1]} and "
                         f"{k.shape[1]}) and positions both given or both default")
    default = q_positions is None
    if default:
        q_positions = k_positions = ring.layout_positions(axis, layout, q.shape[1])
    inp = validate(q, k, v, q_positions, k_positions, q_segment_ids, kv_segment_ids)
    inp = dataclasses.replace(inp, default_k_pos=default, num_keys=n * k.shape[1])
    wrapped = (ring.pass_fn(local, axis, layout) if strategy == "ring"
               else ring.gather_pass_fn(local, axis))
    return streaming_attend(wrapped, q, k, v, spec, inp)
