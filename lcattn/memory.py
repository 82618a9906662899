r"""HMT: hierarchical memory around any ``DecoderLM`` backbone.

Zifan He et al. 2024, "HMT: Hierarchical Memory Transformer for Long Context Language
Processing" (arXiv 2405.06067). ``HMT(backbone, HMTConfig(...))`` turns a ``DecoderLM`` into a
segment-recurrent model. ``tokens [B, T]`` are cut into segments ``H_1, H_2, ...`` of
``L = segment_len`` tokens (the last may be shorter). With ``x(.)`` the backbone's token
embeddings and ``BB(.)`` its blocks followed by its final norm on a ``[B, len, D]`` input,
segment ``n`` is processed as:

1. sensory memory: ``K_n`` = the embeddings of the last ``k = sensory_len`` tokens before the
   segment (none before the first segment);
2. representation extraction, with the learned summary prompt ``T [D]`` and
   ``j = summary_len`` (default ``L // 2``)::

       S_n = BB([T ‖ x(H_n[0:j]) ‖ T])[last position]                           [B, D]

3. memory recall over the FIFO cache ``M [N, D]`` of the last ``N = num_memories`` memory
   embeddings (no value projection; ``W_q, W_k [D, d_h]``, ``d_h = memory_dim``)::

       P_n = softmax((S_n W_q)(M W_k)^T / sqrt(d_h)) M                          [B, D]

4. segment processing::

       h = BB([P_n ‖ K_n ‖ x(H_n) ‖ P_n])

   the logits of the ``H_n`` positions are kept; the memory embedding ``m_n = h[last]`` is
   pushed into ``M`` (the oldest is evicted once ``N`` are held).

Memory embeddings live in ``d_model`` space and are taken after the backbone's final norm
(the vector its head reads), so they enter the next segments at the scale of token embeddings.
Every backbone call uses positions ``0 .. len-1`` of the sequence it sees.

The cache starts empty and holds only memory embeddings that segments produced, as in the
official code (HMT-pytorch): the learned initial memory ``M_0 [D]`` stands in for ``P_1``
(the first segment skips the extraction) but is never a recall candidate, so segment 2
recalls exactly ``m_1``. Ablations: ``recall=False`` uses the
newest memory embedding as ``P_n`` (RMT-style, no extraction); ``num_memories=0`` (which needs
``recall=False``) drops the memory tokens, so the backbone sees ``[K_n ‖ H_n]``, and with
``sensory_len=0`` as well it runs on each segment separately.

Training: ``bptt_segments = K`` truncates backpropagation through time: the carried state
(cache and sensory embeddings) is cut with ``stop_gradient`` in front of segment ``n`` when
``(S - n) % K == 0`` (``S`` segments in the call), i.e. the sequence is split into blocks of
``K`` segments counted back from the last, so the last segment's loss reaches the ``K - 1``
segments before it (``None``: all of them). ``loss_mask`` keeps every position
(``loss_segments="all"``) or, with ``"last"`` (the paper's choice), the predictions *of the
last segment's tokens*, aligned as the official code scores them (``logits[-(B+1):-1]``
against ``labels[-B:]``): the previous segment's last position predicts the segment's first
token and the row's final position, whose target lies past the row, predicts nothing.

Official configurations: their ``segment_length`` is the whole backbone window
``[P ‖ K ‖ H ‖ P]``, i.e. ``segment_len + sensory_len + 2`` here (``HMTConfig``).

Causality: as in the paper, ``P_n`` depends on ``H_n[0:j]``, so the logits of a segment's first
``j - 1`` positions are computed with a summary that includes later tokens (through the ``N``
recall weights only). Teacher-forced losses therefore are not strictly causal there;
``summary_len=0`` removes this (the query then depends on the memory alone). ``generate`` is
causal: every new token comes from a forward pass over the known prefix only.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lcattn import checks, sharding
from lcattn.layers.attention import SpecOverride
from lcattn.layers.params import param
from lcattn.model import DecoderLM

LOSS_SEGMENTS = ("all", "last")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HMTConfig:
    """HMT's sizes and training options (validated on construction; see the module doc).

    Attributes:
      segment_len: ``L``, tokens per segment (>= 1). The official code's ``segment_length``
        is the backbone window ``L + k + 2`` (memory tokens and sensory memory included), so
        ``segment_len = segment_length - sensory_len - 2``.
      sensory_len: ``k``, sensory-memory tokens carried from the previous segment, ``[0, L)``.
      num_memories: ``N``, memory embeddings in the FIFO cache (>= 0; 0: no memory tokens).
      summary_len: ``j``, segment tokens the summary prompt reads, ``[0, L]``; None: ``L // 2``.
      recall: cross-attention recall over the cache (needs ``N >= 1``); False: ``P_n`` is the
        newest memory embedding (or nothing when ``N = 0``).
      memory_dim: ``d_h``, width of the recall projections; None: ``d_model``.
      bptt_segments: segments one backward pass spans (>= 1); None: every segment of a row.
      loss_segments: ``"all"`` (every position) or ``"last"`` (the predictions of the last
        segment's tokens, the official alignment; module doc).
    """

    segment_len: int
    sensory_len: int
    num_memories: int
    summary_len: int | None = None
    recall: bool = True
    memory_dim: int | None = None
    bptt_segments: int | None = None
    loss_segments: str = "last"

    def __post_init__(self):
        checks.integer("HMTConfig", "segment_len", self.segment_len, minimum=1)
        checks.integer("HMTConfig", "sensory_len", self.sensory_len, minimum=0)
        if self.sensory_len >= self.segment_len:
            raise ValueError(f"HMTConfig: `sensory_len` must be in [0, segment_len="
                             f"{self.segment_len}), got {self.sensory_len}")
        checks.integer("HMTConfig", "num_memories", self.num_memories, minimum=0)
        if self.summary_len is not None:
            checks.integer("HMTConfig", "summary_len", self.summary_len, minimum=0,
                           maximum=self.segment_len)
        if not isinstance(self.recall, bool):
            raise ValueError(f"HMTConfig: `recall` must be True or False, got {self.recall!r}")
        if self.recall and self.num_memories == 0:
            raise ValueError("HMTConfig: `recall=True` needs `num_memories` >= 1 (num_memories=0 "
                             "means no memory tokens; set recall=False)")
        for name in ("memory_dim", "bptt_segments"):
            checks.integer("HMTConfig", name, getattr(self, name), allow_none=True)
        checks.choice("HMTConfig", "loss_segments", self.loss_segments, LOSS_SEGMENTS)

    @property
    def summary_tokens(self) -> int:
        """``j``: ``summary_len``, default ``segment_len // 2``."""
        return self.segment_len // 2 if self.summary_len is None else self.summary_len


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("memories", "valid", "sensory"), meta_fields=("started",))
@dataclasses.dataclass(frozen=True)
class MemoryState:
    """The recurrent state between segments (a pytree; ``started`` is static).

    Attributes:
      memories: ``[B, N, D]`` the FIFO cache, oldest first (slot ``N - 1`` is the newest).
      valid: ``bool [B, N]``, True for filled slots (none before the first produced memory).
      sensory: ``[B, k', D]`` embeddings of the last ``k' <= k`` tokens seen (``k' = 0`` at
        the start).
      started: False until a segment has been processed (the first segment uses ``M_0``).
    """

    memories: jax.Array
    valid: jax.Array
    sensory: jax.Array
    started: bool = False


class HMT(nnx.Module):
    """A ``DecoderLM`` made segment-recurrent with HMT's memory (equations in the module doc).

    Parameters besides the backbone's (float32; logical axes in brackets):
    ``initial_memory [D]`` (``embed``) when ``num_memories >= 1``; ``summary_prompt [D]``
    (``embed``), ``w_q``, ``w_k [D, d_h]`` (``embed, head_dim``) when ``recall``. ``M_0`` and
    ``T`` are drawn from ``N(0, s^2)`` with ``s`` the standard deviation of the backbone's
    token embeddings (as the official code), so they suit a pretrained backbone too.
    """

    def __init__(self, backbone: DecoderLM, config: HMTConfig, *, rngs: nnx.Rngs):
        if not isinstance(backbone, DecoderLM):
            raise ValueError(f"HMT: `backbone` must be a DecoderLM, got {type(backbone).__name__}")
        if not isinstance(config, HMTConfig):
            raise ValueError(f"HMT: `config` must be an HMTConfig, got {config!r}")
        self.backbone, self.config = backbone, config
        d = backbone.d_model
        # M_0 and T start at the scale of the backbone's token embeddings x(.), as the official
        # code draws them (randn * std of the embedding table): ~1 for lcattn's own models,
        # the table's std (~0.02) for an imported Llama
        scale = jnp.std(backbone.embedding[...]) * (
            math.sqrt(d) if backbone.conventions.scale_embeddings else 1.0)

        def unit(key, shape, dtype):
            return jax.random.normal(key, shape, dtype) * scale.astype(dtype)
        self.initial_memory = param(rngs, unit, (d,), ("embed",)) if config.num_memories \
            else None
        d_h, proj = config.memory_dim or d, nnx.initializers.lecun_normal()
        recall = config.recall
        self.summary_prompt = param(rngs, unit, (d,), ("embed",)) if recall else None
        self.w_q = param(rngs, proj, (d, d_h), ("embed", "head_dim")) if recall else None
        self.w_k = param(rngs, proj, (d, d_h), ("embed", "head_dim")) if recall else None

    # -- state and the memory math ---------------------------------------------------------
    def init_state(self, batch_size: int) -> MemoryState:
        """The state before the first segment: an empty cache (``M_0`` is not in it)."""
        d, n, dtype = self.backbone.d_model, self.config.num_memories, self.backbone.dtype
        return MemoryState(jnp.zeros((batch_size, n, d), dtype), jnp.zeros((batch_size, n), bool),
                           jnp.zeros((batch_size, 0, d), dtype), started=False)

    def summarize(self, x: jax.Array, **kw) -> jax.Array:
        """``S_n [B, D]`` from the segment's embeddings ``x [B, l, D]`` (its first ``j``)."""
        b, l, d = x.shape
        prompt = jnp.broadcast_to(self.summary_prompt[...].astype(x.dtype), (b, 1, d))
        j = min(self.config.summary_tokens, l)
        h = self.backbone.forward_embeddings(
            jnp.concatenate([prompt, x[:, :j], prompt], axis=1), **kw)
        return self.backbone.final_norm(h[:, -1])

    def recall(self, summary: jax.Array, state: MemoryState) -> jax.Array:
        """``P_n = softmax((S_n W_q)(M W_k)^T / sqrt(d_h)) M`` over the filled slots: ``[B, D]``."""
        mem = state.memories.astype(jnp.float32)
        q = summary.astype(jnp.float32) @ self.w_q[...]
        k = jnp.einsum("bnd,dh->bnh", mem, self.w_k[...])
        # sqrt(d_h), as the paper and the official code at its paper-era commit. Its head commit
        # divides by d_h once the widths reach 4096, but its generation path keeps sqrt(d_h), so
        # training and generation disagree there; not copied.
        scores = jnp.einsum("bh,bnh->bn", q, k) / math.sqrt(q.shape[-1])
        weights = jax.nn.softmax(jnp.where(state.valid, scores, -jnp.inf), axis=-1)
        return jnp.einsum("bn,bnd->bd", weights, mem).astype(state.memories.dtype)

    def _segment(self, state: MemoryState, x: jax.Array, kw: dict):
        """One segment ``x [B, l, D]`` -> ``(logits [B, l, V], next state)``."""
        cfg, b, l = self.config, x.shape[0], x.shape[1]
        parts = [state.sensory, x]
        if cfg.num_memories:
            if not state.started:   # P_1 = M_0, which never enters the cache
                p = jnp.broadcast_to(self.initial_memory[...], (b, x.shape[-1]))
            elif cfg.recall:
                p = self.recall(self.summarize(x, **kw), state)
            else:
                p = state.memories[:, -1]
            p = p[:, None].astype(x.dtype)
            parts = [p, *parts, p]
        hidden = self.backbone.forward_embeddings(jnp.concatenate(parts, axis=1), **kw)
        first = state.sensory.shape[1] + (1 if cfg.num_memories else 0)
        logits = self.backbone.logits(hidden[:, first:first + l])
        seen = jnp.concatenate([state.sensory, x], axis=1)
        sensory = seen[:, seen.shape[1] - min(cfg.sensory_len, seen.shape[1]):]
        memories, valid = state.memories, state.valid
        if cfg.num_memories:
            m = self.backbone.final_norm(hidden[:, -1]).astype(memories.dtype)
            memories = jnp.concatenate([memories[:, 1:], m[:, None]], axis=1)
            valid = jnp.concatenate([valid[:, 1:], jnp.ones((b, 1), bool)], axis=1)
        return logits, MemoryState(memories, valid, sensory, started=True)

    # -- forward ---------------------------------------------------------------------------
    def process(self, tokens: jax.Array, state: MemoryState | None = None, *,
                attention_override: SpecOverride = None, backend: str | None = None):
        """Run the recurrence over ``tokens int32 [B, T]`` from ``state`` (None: the start).

        Returns ``(logits float32 [B, T, V], state after the last segment)``. Segments start
        at multiples of ``segment_len`` from this call's first token, so a long input split
        at such multiples and chained through ``state`` gives the same logits. Full segments
        run under one ``lax.scan`` (the first outside it while the sensory memory fills); a
        shorter last segment runs after it. ``attention_override`` / ``backend`` are passed
        to every backbone call.
        """
        checks.tokens(tokens)
        b, t = tokens.shape
        if t < 1:
            raise ValueError("HMT: `tokens` must hold at least one token per row")
        cfg, size = self.config, self.config.segment_len
        state = self.init_state(b) if state is None else state
        kw = dict(attention_override=attention_override, backend=backend)
        x = self.backbone.embed(tokens)
        num_full, num = t // size, -(-t // size)

        def truncate(state, n):  # BPTT: cut the carried state in front of segment n
            if cfg.bptt_segments is None:
                return state
            cut = (n > 0) & ((num - n) % cfg.bptt_segments == 0)
            return jax.tree.map(lambda a: jnp.where(cut, jax.lax.stop_gradient(a), a), state)

        outs, n = [], 0
        if num_full and (not state.started or state.sensory.shape[1] < cfg.sensory_len):
            logits, state = self._segment(state, x[:, :size], kw)
            outs.append(logits)
            n = 1
        if num_full > n:
            xs = x[:, n * size:num_full * size].reshape(b, num_full - n, size, -1)

            def body(state, inputs):
                xi, i = inputs
                logits, state = self._segment(truncate(state, i), xi, kw)
                return state, logits

            state, logits = jax.lax.scan(body, state, (xs.swapaxes(0, 1),
                                                       jnp.arange(n, num_full)))
            outs.append(logits.swapaxes(0, 1).reshape(b, (num_full - n) * size, -1))
        if t % size:
            logits, state = self._segment(truncate(state, num_full), x[:, num_full * size:], kw)
            outs.append(logits)
        return jnp.concatenate(outs, axis=1), state

    def __call__(self, tokens: jax.Array, *, attention_override: SpecOverride = None,
                 backend: str | None = None) -> jax.Array:
        """``tokens int32 [B, T] -> logits float32 [B, T, V]`` through the recurrence (each row
        is one stream starting at the start state)."""
        sharding.check_no_context("HMT")
        return self.process(tokens, attention_override=attention_override, backend=backend)[0]

    def loss_mask(self, loss_mask: jax.Array) -> jax.Array:
        """The training mask ``[B, T]`` (position ``i`` predicts token ``i + 1``) restricted as
        ``loss_segments`` says: ``"last"`` keeps positions ``[s - 1, T - 1)`` with ``s`` the
        last segment's start, i.e. the predictions of its tokens (module doc)."""
        if self.config.loss_segments == "all":
            return loss_mask
        t = loss_mask.shape[1]
        last = (t - 1) // self.config.segment_len * self.config.segment_len
        pos = jnp.arange(t)
        return loss_mask * ((pos >= max(last - 1, 0)) & (pos < t - 1)).astype(loss_mask.dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "override", "backend"))
def _process(params, tokens, memory, *, graphdef, override, backend):
    return nnx.merge(graphdef, params).process(tokens, memory, attention_override=override,
                                               backend=backend)


def generate(model: HMT, prompt: jax.Array, num_new_tokens: int, *,
             attention_override: SpecOverride = None, backend: str | None = None) -> jax.Array:
    """Greedy continuation through the recurrence: ``prompt int32 [B, T] -> [B, num_new_tokens]``.

    HMT has no KV cache (a segment's summary and memory tokens depend on the whole segment),
    so each new token re-runs the last, incomplete segment from the memory state of the
    complete segments before it (those run once): every token is the argmax of the forward
    pass over exactly the tokens known when it is produced. One compilation per distinct
    length of that last segment.
    """
    checks.tokens(prompt, "prompt")
    if not isinstance(model, HMT):
        raise ValueError(f"generate: `model` must be an HMT, got {type(model).__name__}")
    checks.integer("memory.generate", "num_new_tokens", num_new_tokens, minimum=0)
    if prompt.shape[1] < 1:
        raise ValueError("generate: `prompt` must hold at least one token per row")
    graphdef, params = nnx.split(model)
    run = functools.partial(_process, params, graphdef=graphdef, override=attention_override,
                            backend=backend)
    size = model.config.segment_len
    tokens, done, memory, new = jnp.asarray(prompt, jnp.int32), 0, None, []
    for _ in range(int(num_new_tokens)):
        start = (tokens.shape[1] - 1) // size * size
        if start > done:
            _, memory = run(tokens[:, done:start], memory)
            done = start
        logits, _ = run(tokens[:, start:], memory)
        new.append(jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
        tokens = jnp.concatenate([tokens, new[-1][:, None]], axis=1)
    return jnp.stack(new, axis=1) if new else jnp.zeros((prompt.shape[0], 0), jnp.int32)
