"""``DecoderLM``: a decoder-only LM whose layers mix sequence mixers, with KV-cache decoding.

Each layer is a pre-norm residual block ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``
(SwiGLU; ``mlp_dim=0``: no MLP, as in Mamba-2 checkpoints); a final RMSNorm and a tied
(``logits = h E^T``) or untied head give float32 logits. Input embeddings are scaled by
``sqrt(d_model)``; the embedding table starts at std ``1/sqrt(d_model)`` so both the residual
stream and the tied logits start near unit scale. ``Conventions`` holds the details in which
other codebases' checkpoints differ (no embedding scale, norm epsilon, attention biases);
``lcattn.pretrained`` sets them when it loads one.

``layer_pattern`` names each layer's mixer, looked up in ``MIXERS``. A mixer kind is built
by ``build(dims, spec, rngs)`` and is an ``nnx.Module`` with

* ``__call__(x [B,T,D], *, positions, segment_ids) -> [B,T,D]``,
* ``init_cache(batch_size, max_len, *, dtype) -> cache`` (any pytree of arrays),
* ``extend(x, cache, *, positions) -> (y, cache)`` (prefill: the prompt; decode: ``T = 1``);

attention kinds (``MixerKind.attention``) also take ``spec=`` (the evaluation-time override)
and ``backend=`` in all three, and get their layer's ``AttentionSpec`` at build time.
Adding a mixer is one ``MIXERS`` entry. Kinds: ``"attn"`` (``lcattn.layers.Attention``) and
``"mamba2"`` (``lcattn.layers.Mamba2``, sized by ``DecoderLM(mamba2=Mamba2Config(...))``;
segment ids reset its state, so packed documents never see each other).

Embeddings-level entry points (one code path: ``__call__`` is
``logits(forward_embeddings(embed(tokens)))``): ``embed(tokens [B,T]) -> [B,T,D]``,
``forward_embeddings(x [B,T,D], *, positions, segment_ids) -> hidden [B,T,D]`` (before the
final norm) and ``logits(hidden) -> [B,T,V]``; wrappers that feed their own vectors to the
blocks (``lcattn.memory.HMT``) use them.

Decoding (``init_cache`` / ``prefill`` / ``decode_step`` / ``generate``): the cache is a
tuple with one entry per layer; see ``lcattn.layers.attention.KVCache`` for the full and the
constant-size (Λ-mask sink + ring buffer) layouts, and ``lcattn.layers.mamba2.Mamba2Cache``
for the (constant-size) recurrent state of Mamba-2 layers.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lcattn import backends, checks, sharding
from lcattn.attention import AttentionSpec
from lcattn.backends import ring_plan
from lcattn.layers import Attention, Mamba2, Mamba2Config, RMSNorm, SwiGLU
from lcattn.layers.attention import SpecOverride, resolve_spec
from lcattn.layers.params import param
from lcattn.positions import broadcast as broadcast_positions


@dataclasses.dataclass(frozen=True)
class Conventions:
    """Where decoders of other codebases differ from lcattn's own (defaults: lcattn's).

    Attributes:
      scale_embeddings: multiply input embeddings by ``sqrt(d_model)`` (lcattn, Gemma) or
        not (Llama, Mistral, Qwen2, Mamba-2).
      norm_eps: epsilon of every block's and the final RMSNorm (Llama's ``rms_norm_eps``).
      qkv_bias: biases on the q, k, v projections (Qwen2; Llama's ``attention_bias``).
      out_bias: bias on the attention output projection (Llama's ``attention_bias``).
    """

    scale_embeddings: bool = True
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False

    def __post_init__(self):
        checks.positive("Conventions", "norm_eps", self.norm_eps)
        for name in ("scale_embeddings", "qkv_bias", "out_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Conventions: `{name}` must be a bool, got "
                                 f"{getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class Dims:
    """Model sizes (and conventions) handed to every mixer builder."""

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mamba2: Mamba2Config = Mamba2Config()
    conventions: Conventions = Conventions()


@dataclasses.dataclass(frozen=True)
class MixerKind:
    """``build(dims, spec, rngs) -> nnx.Module``; ``attention``: it takes specs and backends."""

    build: Callable[[Dims, AttentionSpec | None, nnx.Rngs], nnx.Module]
    attention: bool


def _build_attention(dims: Dims, spec: AttentionSpec | None, rngs: nnx.Rngs) -> Attention:
    c = dims.conventions
    return Attention(dims.d_model, dims.num_heads, dims.num_kv_heads, dims.head_dim, spec,
                     rngs=rngs, qkv_bias=c.qkv_bias, out_bias=c.out_bias)


def _build_mamba2(dims: Dims, spec: AttentionSpec | None, rngs: nnx.Rngs) -> Mamba2:
    del spec  # takes no AttentionSpec
    return Mamba2(dims.d_model, dims.mamba2.for_model(dims.d_model, dims.num_heads), rngs=rngs)


# Logical axes of the residual stream [B, T, D] (``lcattn.sharding``).
RESIDUAL_AXES = ("batch", "length", "act_embed")
# ``DecoderLM(remat=...)``: names of ``jax.checkpoint_policies`` without arguments.
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")

MIXERS: dict[str, MixerKind] = {"attn": MixerKind(_build_attention, attention=True),
                                "mamba2": MixerKind(_build_mamba2, attention=False)}


def _layer_specs(layer_pattern, attention_specs) -> tuple[AttentionSpec | None, ...]:
    """One spec (or None) per layer from ``attention_specs`` (None, one spec, or a tuple)."""
    if isinstance(layer_pattern, str) or not isinstance(layer_pattern, Sequence) \
            or not layer_pattern:
        raise ValueError(f"`layer_pattern` must be a non-empty tuple of mixer names, "
                         f"got {layer_pattern!r}")
    for i, kind in enumerate(layer_pattern):
        if kind not in MIXERS:
            attention = sorted(k for k, m in MIXERS.items() if m.attention)
            other = sorted(k for k, m in MIXERS.items() if not m.attention)
            raise ValueError(f"unknown mixer {kind!r} at layer {i} of `layer_pattern`; "
                             f"allowed: {attention} (attention), {other} (state)")
    n = len(layer_pattern)
    if attention_specs is None or isinstance(attention_specs, AttentionSpec):
        return tuple(attention_specs if MIXERS[k].attention else None for k in layer_pattern)
    if isinstance(attention_specs, str) or not isinstance(attention_specs, Sequence):
        raise ValueError("`attention_specs` must be None, an AttentionSpec or a tuple with one "
                         f"entry per layer, got {attention_specs!r}")
    if len(attention_specs) != n:
        raise ValueError(f"`attention_specs` has {len(attention_specs)} entries but "
                         f"`layer_pattern` has {n} layers")
    for i, (kind, spec) in enumerate(zip(layer_pattern, attention_specs)):
        if spec is not None and not isinstance(spec, AttentionSpec):
            raise ValueError(f"`attention_specs[{i}]` must be an AttentionSpec or None, "
                             f"got {spec!r}")
        if spec is not None and not MIXERS[kind].attention:
            raise ValueError(f"layer {i} is {kind!r}, which takes no AttentionSpec "
                             f"(`attention_specs[{i}]` must be None)")
    return tuple(attention_specs)


class Block(nnx.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` (no MLP
    when ``mlp_dim == 0``)."""

    def __init__(self, kind: str, dims: Dims, mlp_dim: int, spec: AttentionSpec | None, *,
                 rngs: nnx.Rngs):
        self.kind = kind
        self.attention = MIXERS[kind].attention
        eps = dims.conventions.norm_eps
        self.mixer_norm = RMSNorm(dims.d_model, eps, rngs=rngs)
        self.mixer = MIXERS[kind].build(dims, spec, rngs)
        self.mlp_norm = RMSNorm(dims.d_model, eps, rngs=rngs) if mlp_dim else None
        self.mlp = SwiGLU(dims.d_model, mlp_dim, rngs=rngs) if mlp_dim else None

    def _feed_forward(self, x):
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

    def _options(self, override, backend) -> dict:
        return {"spec": override, "backend": backend} if self.attention else {}

    def __call__(self, x, *, positions, segment_ids, override, backend, context_layout):
        opts = self._options(override, backend)
        if self.attention:
            opts["context_layout"] = context_layout
        x = x + self.mixer(self.mixer_norm(x), positions=positions, segment_ids=segment_ids,
                           **opts)
        return self._feed_forward(x)

    def init_cache(self, batch_size, max_len, *, override, dtype):
        opts = {"spec": override} if self.attention else {}
        return self.mixer.init_cache(batch_size, max_len, dtype=dtype, **opts)

    def extend(self, x, cache, *, positions, override, backend):
        y, cache = self.mixer.extend(self.mixer_norm(x), cache, positions=positions,
                                     **self._options(override, backend))
        return self._feed_forward(x + y), cache


class DecoderLM(nnx.Module):
    """Decoder-only language model over ``layer_pattern`` (see the module docstring).

    Args:
      layer_pattern: mixer name per layer (keys of ``MIXERS``).
      attention_specs: None (``AttentionSpec()``: causal softmax RoPE), one AttentionSpec for
        every attention layer, or a tuple with one entry per layer (None for non-attention
        layers, or for the default spec).
      tie_embeddings: output head ``E^T`` (True) or its own ``[d_model, vocab]`` matrix.
      backend: default ``lcattn.attend`` backend of the attention layers.
      mamba2: sizes and SSM options of the ``"mamba2"`` layers (None: ``Mamba2Config()``).
      dtype: compute dtype of the matmuls and activations (and of the KV cache);
        parameters stay float32, attention statistics, norms' statistics and logits are
        float32 whatever it is.
      remat: None (store activations for the backward pass) or the name of a
        ``jax.checkpoint_policies`` policy (``REMAT_POLICIES``), e.g. ``"nothing_saveable"``:
        each block is rematerialized (``nnx.remat``) under it, trading compute for memory.
      mlp_dim: SwiGLU width, or 0 for blocks without an MLP.
      conventions: ``Conventions`` (embedding scale, norm epsilon, attention biases).
    """

    def __init__(self, *, vocab_size: int, d_model: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, mlp_dim: int, layer_pattern: Sequence[str] = ("attn", "attn"),
                 attention_specs=None, tie_embeddings: bool = True, backend: str = "auto",
                 mamba2: Mamba2Config | None = None, dtype=jnp.float32,
                 remat: str | None = None, conventions: Conventions = Conventions(),
                 rngs: nnx.Rngs):
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model)):
            checks.integer("DecoderLM", name, value)
        checks.integer("DecoderLM", "mlp_dim", mlp_dim, minimum=0)
        if not isinstance(conventions, Conventions):
            raise ValueError(f"DecoderLM: `conventions` must be a Conventions, got "
                             f"{conventions!r}")
        backends.check_name(backend, "DecoderLM")
        if remat is not None:
            checks.choice("DecoderLM", "remat", remat, REMAT_POLICIES)
        specs = _layer_specs(layer_pattern, attention_specs)
        mamba2 = Mamba2Config() if mamba2 is None else mamba2
        if not isinstance(mamba2, Mamba2Config):
            raise ValueError(f"DecoderLM: `mamba2` must be None or a Mamba2Config, got "
                             f"{mamba2!r}")
        dims = Dims(d_model, num_heads, num_kv_heads, head_dim, mamba2, conventions)
        self.layer_pattern, self.backend = tuple(layer_pattern), backend
        self.conventions = conventions
        self.d_model, self.vocab_size, self.dtype = d_model, vocab_size, jnp.dtype(dtype)
        self.remat = remat
        self.embedding = param(rngs, nnx.initializers.normal(1.0 / math.sqrt(d_model)),
                                (vocab_size, d_model), ("vocab", "embed"))
        self.blocks = nnx.List([Block(kind, dims, mlp_dim, spec, rngs=rngs)
                                for kind, spec in zip(self.layer_pattern, specs)])
        self.final_norm = RMSNorm(d_model, conventions.norm_eps, rngs=rngs)
        self.head = None if tie_embeddings else param(
            rngs, nnx.initializers.lecun_normal(), (d_model, vocab_size), ("embed", "vocab"))

    # -- pieces ----------------------------------------------------------------------------
    def embed(self, tokens: jax.Array) -> jax.Array:
        """``tokens int32 [B, T] -> x [B, T, D]``: ``E[tokens] * sqrt(d_model)`` in ``dtype``
        (``E[tokens]`` without ``conventions.scale_embeddings``)."""
        table = sharding.constrain(self.embedding[...], (None, None))  # gathered whole
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        if not self.conventions.scale_embeddings:
            return x
        return x * jnp.asarray(math.sqrt(self.d_model), self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [B, T, D] -> float32 [B, T, V]``: the head (``E^T`` or its own matrix)
        applied to ``final_norm(hidden)``."""
        h = self.final_norm(hidden)
        if self.head is None:
            w, eq = self.embedding[...], "btd,vd->btv"
        else:
            w, eq = self.head[...], "btd,dv->btv"
        return jnp.einsum(eq, h, w.astype(h.dtype),
                          preferred_element_type=jnp.float32).astype(jnp.float32)

    # -- forward ---------------------------------------------------------------------------
    def forward_embeddings(self, x: jax.Array, *, positions=None, segment_ids=None,
                           attention_override: SpecOverride = None,
                           backend: str | None = None,
                           context_layout: str = "contiguous") -> jax.Array:
        """The blocks on input embeddings: ``x [B, T, D] -> hidden [B, T, D]``.

        ``hidden`` is the residual stream after the last block, before ``final_norm``
        (``logits(hidden)`` applies it). ``x`` may hold any vectors of width ``d_model``
        (``embed(tokens)``, or memory embeddings as in ``lcattn.memory.HMT``); it is cast to
        ``dtype``. Arguments as in ``__call__``.
        """
        if jnp.ndim(x) != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"`x` must have shape [batch, seq, d_model={self.d_model}], got "
                             f"{jnp.shape(x)}")
        b, t, _ = x.shape
        if positions is None and context_layout != "contiguous":
            raise ValueError(f"context_layout={context_layout!r} needs `positions` (the "
                             "reordered tokens' own; lcattn.backends.ring_plan.layout_order)")
        positions = broadcast_positions("positions", positions, b, t)
        x = sharding.constrain(x.astype(self.dtype), RESIDUAL_AXES)
        backend = backend or self.backend

        def run(block, x, positions, segment_ids):
            y = block(x, positions=positions, segment_ids=segment_ids,
                      override=attention_override, backend=backend,
                      context_layout=context_layout)
            return sharding.constrain(y, RESIDUAL_AXES)

        if self.remat is not None:
            run = nnx.remat(run, policy=getattr(jax.checkpoint_policies, self.remat))
        for block in self.blocks:
            x = run(block, x, positions, segment_ids)
        return x

    def __call__(self, tokens: jax.Array, *, positions=None, segment_ids=None,
                 attention_override: SpecOverride = None, backend: str | None = None,
                 context_layout: str = "contiguous") -> jax.Array:
        """``tokens int32 [B, T] -> logits float32 [B, T, V]``
        (``logits(forward_embeddings(embed(tokens)))``).

        Args:
          positions: ``int32 [B, T]`` (or ``[T]``) absolute positions; default ``arange(T)``.
          segment_ids: ``int32 [B, T]`` document ids for packed sequences, or None.
          attention_override: applied to every attention layer: an AttentionSpec, or a
            callable ``spec -> spec`` (e.g. evaluate a Causal()-trained model under
            ``Lambda(window, n_global)`` with ``distance_limit``: LM-Infinite).
          backend: overrides every attention layer's backend.
          context_layout: under a mesh with ``context > 1``, which tokens each device holds
            (``"contiguous"``, or ``"zigzag"`` with the batch reordered by
            ``lcattn.backends.ring_plan.layout_order`` and its ``positions`` given);
            ``context_layout()`` says which suits this model.
        """
        checks.tokens(tokens)
        hidden = self.forward_embeddings(self.embed(tokens), positions=positions,
                                         segment_ids=segment_ids,
                                         attention_override=attention_override,
                                         backend=backend, context_layout=context_layout)
        return self.logits(hidden)

    def context_layout(self, attention_override: SpecOverride = None) -> str:
        """The ring layout for this model's attention masks (``ring_plan.preferred_layout``):
        ``"zigzag"`` if a layer sees arbitrarily far back (Causal, Full), else
        ``"contiguous"``."""
        return ring_plan.preferred_layout(
            resolve_spec(block.mixer.spec, attention_override).mask
            for block in self.blocks if block.attention)

    # -- decoding --------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, *,
                   attention_override: SpecOverride = None) -> tuple:
        """Empty decoding state for positions ``< max_len``: a tuple with one entry per layer.

        Attention layers whose (overridden) mask is ``Lambda(window, n_global)`` (or
        ``Local(window)``) get ``n_global + window`` slots whatever ``max_len`` is; pass the
        same ``attention_override`` to ``prefill`` / ``decode_step``. Mamba-2 layers hold a
        recurrent state whose size does not depend on ``max_len``.
        """
        return tuple(block.init_cache(batch_size, max_len, override=attention_override,
                                      dtype=self.dtype) for block in self.blocks)

    def _extend(self, tokens, positions, cache, override, backend):
        if not isinstance(cache, tuple) or len(cache) != len(self.blocks):
            raise ValueError(f"`cache` must be the tuple from init_cache with one entry per "
                             f"layer ({len(self.blocks)})")
        x = self.embed(tokens)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block.extend(x, layer_cache, positions=positions,
                                          override=override, backend=backend or self.backend)
            new_cache.append(layer_cache)
        return self.logits(x), tuple(new_cache)

    @nnx.jit(static_argnames=("attention_override", "backend"), graph_updates=False)
    def prefill(self, tokens: jax.Array, cache: tuple, *, positions=None,
                attention_override: SpecOverride = None, backend: str | None = None):
        """Run the prompt ``tokens [B, T]`` against ``cache``; returns ``(logits [B,T,V], cache)``.

        ``positions`` default to ``arange(T)``; a later chunk of a long prompt continues with
        its own (later) positions. Compiled with ``nnx.jit`` (``attention_override`` and
        ``backend`` are static: pass the same override object to reuse the compilation); it
        leaves the model unchanged, so it also nests inside ``jax.jit`` / ``lax.scan``.
        """
        checks.tokens(tokens)
        b, t = tokens.shape
        positions = jnp.asarray(broadcast_positions("positions", positions, b, t))
        return self._extend(tokens, positions, cache, attention_override, backend)

    @nnx.jit(static_argnames=("attention_override", "backend"), graph_updates=False)
    def decode_step(self, token: jax.Array, position, cache: tuple, *,
                    attention_override: SpecOverride = None, backend: str | None = None):
        """One token per row: ``token [B, 1]`` at ``position`` (``[B]`` or a scalar).

        Returns ``(logits float32 [B, V], cache)``. Compiled like ``prefill``.
        """
        checks.tokens(token, "token")
        if token.shape[1] != 1:
            raise ValueError(f"`token` must have shape [batch, 1], got {token.shape}")
        b = token.shape[0]
        pos = jnp.broadcast_to(jnp.reshape(jnp.asarray(position, jnp.int32), (-1, 1)), (b, 1))
        logits, cache = self._extend(token, pos, cache, attention_override, backend)
        return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "num_new_tokens", "override",
                                             "backend"))
def _generate(state, prompt, *, graphdef, num_new_tokens, override, backend):
    model = nnx.merge(graphdef, state)
    b, t = prompt.shape
    cache = model.init_cache(b, t + num_new_tokens, attention_override=override)
    logits, cache = model.prefill(prompt, cache, attention_override=override,
                                  backend=backend)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, pos):
        token, cache = carry
        logits, cache = model.decode_step(token[:, None], pos, cache,
                                          attention_override=override, backend=backend)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (nxt, cache), nxt

    positions = jnp.arange(t, t + num_new_tokens - 1, dtype=jnp.int32)
    _, rest = jax.lax.scan(step, (first, cache), positions)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: DecoderLM, prompt: jax.Array, num_new_tokens: int, *,
             attention_override: SpecOverride = None, backend: str | None = None) -> jax.Array:
    """Greedy continuation: ``prompt int32 [B, T] -> int32 [B, num_new_tokens]``.

    One compiled program (prefill, then a ``lax.scan`` of decode steps) per model structure,
    prompt shape, length and override; the KV cache is sized ``T + num_new_tokens`` (constant
    for Λ-mask layers).
    """
    checks.tokens(prompt, "prompt")
    checks.integer("generate", "num_new_tokens", num_new_tokens, minimum=0)
    if num_new_tokens == 0:
        return jnp.zeros((prompt.shape[0], 0), jnp.int32)
    graphdef, state = nnx.split(model)
    return _generate(state, jnp.asarray(prompt, jnp.int32), graphdef=graphdef,
                     num_new_tokens=int(num_new_tokens), override=attention_override,
                     backend=backend)


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param`` leaves) in ``model``."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
