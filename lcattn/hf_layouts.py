"""Hugging Face ``config.json`` and tensor layouts <-> ``DecoderLM`` arguments and parameters.

Two families (``ARCHITECTURES``):

* ``"llama"``: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``: pre-norm
  blocks ``x + attn(rms(x))``, ``x + swiglu(rms(x))``, GQA, RoPE in the half-split
  ("rotate_half") convention -- the one ``lcattn.positions.RoPE`` uses, so the q/k weights map
  without a permutation (Meta's original interleaved checkpoints are permuted by transformers'
  conversion script; a layout test checks it). Unscaled embeddings, ``rms_norm_eps``, q/k/v
  biases (Qwen2; Llama's ``attention_bias`` adds an o bias too), Mistral's ``sliding_window``
  as ``Local(window)`` (``0 <= q - k < window``, as transformers masks it).
* ``"mamba2"``: ``Mamba2ForCausalLM``: blocks ``x + mamba2(rms(x))`` with no MLP;
  ``in_proj`` rows are ``[z | x | B | C | dt]``, the depthwise ``conv1d`` over ``[x | B | C]``
  has its taps oldest first (``lcattn.ssm.causal_conv``: newest first, so they are flipped),
  and the gated RMSNorm normalizes per group (``Mamba2Config(gated_norm="group")``).

``Config`` reads ``config.json`` and refuses any field it does not know or any value it cannot
represent (an error naming the field), so a checkpoint never loads as a different model.
``Tensor`` maps one checkpoint tensor to one or more lcattn parameters and back through its
``Layout`` (``split`` / ``join``, jnp, hashable by value).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from lcattn import masks, normalizers, positions
from lcattn.attention import AttentionSpec
from lcattn.layers.mamba2 import Mamba2Config
from lcattn.model import Conventions
from lcattn.ssm import SSMOptions

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "llama", "Mamba2ForCausalLM": "mamba2"}
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Mamba2ForCausalLM": "mamba2"}
# Fields that never change the forward pass (bookkeeping, initialization, generation, dropout
# off at evaluation, or a tensor-parallel split that transformers undoes: pretraining_tp).
HARMLESS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "attention_dropout", "pretraining_tp", "max_position_embeddings", "tokenizer_class",
    "output_attentions", "output_hidden_states", "return_dict", "is_decoder",
    "max_window_layers", "time_step_min", "time_step_max", "time_step_floor",
    "time_step_rank", "rescale_prenorm_residual", "residual_in_fp32", "id2label", "label2id",
    "use_return_dict", "tie_encoder_decoder", "torchscript", "use_mambapy"}
# Weights a checkpoint may carry that are not parameters (old RoPE buffers).
IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)


class Config:
    """``config.json`` as read: ``get`` / ``require`` mark fields used; ``finish`` refuses the
    rest unless harmless."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where, self.used = raw, where, set()

    def error(self, field: str, message: str) -> ValueError:
        return ValueError(f"{self.where}: field {field!r} {message}")

    def get(self, field: str, default=None):
        self.used.add(field)
        value = self.raw.get(field, default)
        return default if value is None else value

    def require(self, field: str):
        if self.raw.get(field) is None:
            raise self.error(field, "is required and missing")
        return self.get(field)

    def expect(self, field: str, allowed: tuple, default=None):
        """The field's value, which must be one of ``allowed`` (missing: ``default``)."""
        value = self.get(field, default)
        if value not in allowed:
            raise self.error(field, f"= {value!r} changes the model in a way lcattn does not "
                                    f"implement; supported: {allowed}")
        return value

    def finish(self) -> None:
        unknown = sorted(k for k in self.raw if k not in self.used and k not in HARMLESS
                         and not k.startswith("_"))
        if unknown:
            raise self.error(unknown[0], f"is not understood by lcattn.pretrained (unknown: "
                                         f"{unknown}); refusing rather than loading a model "
                                         "that may compute something else")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one checkpoint tensor becomes lcattn parameters: ``split(a) -> tuple`` and back,
    ``join(*parts)``, written with ``jnp`` (so ``lcattn.pretrained`` runs ``split`` under
    ``jax.jit`` on the device) and hashable by value (one compilation per distinct layout and
    shape).

    Kinds: ``"same"`` (``args``: the lcattn shape or ``()`` for unchanged), ``"transposed"``
    (``[out, in] <-> [in, out]``), ``"linear"`` (``[out, in] <-> [in, *args]``),
    ``"linear_out"`` (``[out, in] <-> [*args, out]``), and Mamba-2's ``"in_proj"``
    (``[z | x | B | C | dt]`` rows), ``"conv"`` (``[C, 1, W]`` taps oldest first <-> ``x, B, C``
    of ``[W, ...]`` newest first) and ``"conv_bias"``, with ``args = (d, h, p, g, n, w)``.
    """

    kind: str
    args: tuple = ()

    def split(self, a) -> tuple:
        k, args = self.kind, self.args
        if k == "same":
            return (a.reshape(args) if args else a,)
        if k == "transposed":
            return (a.T,)
        if k == "linear":
            return (a.T.reshape(a.shape[1], *args),)
        if k == "linear_out":
            return (a.T.reshape(*args, a.shape[0]),)
        d, h, p, g, n, w = args
        if k == "in_proj":
            z, x, b, c, dt = jnp.split(a.T, self._cuts(), axis=1)
            return (z.reshape(d, h, p), x.reshape(d, h, p), b.reshape(d, g, n),
                    c.reshape(d, g, n), dt)
        if k == "conv":
            x, b, c = jnp.split(a[:, 0, ::-1].T, self._cuts()[1:3] - h * p, axis=1)
            return x.reshape(w, h, p), b.reshape(w, g, n), c.reshape(w, g, n)
        x, b, c = jnp.split(a, self._cuts()[1:3] - h * p)      # conv_bias
        return x.reshape(h, p), b.reshape(g, n), c.reshape(g, n)

    def join(self, *parts):
        k, args = self.kind, self.args
        if k == "same":
            return parts[0].reshape(-1) if args else parts[0]
        if k == "transposed":
            return parts[0].T
        if k == "linear":
            return parts[0].reshape(parts[0].shape[0], -1).T
        if k == "linear_out":
            return parts[0].reshape(-1, parts[0].shape[-1]).T
        d, h, p, g, n, w = args
        if k == "in_proj":
            return jnp.concatenate([x.reshape(d, -1) for x in parts], axis=1).T
        if k == "conv":
            return jnp.concatenate([x.reshape(w, -1) for x in parts], axis=1).T[:, None, ::-1]
        return jnp.concatenate([x.reshape(-1) for x in parts])

    def _cuts(self):
        d, h, p, g, n, w = self.args
        return np.cumsum([h * p, h * p, g * n, g * n])


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Checkpoint tensor ``name`` <-> lcattn parameters ``params`` (paths in the model state),
    converted by ``layout``."""

    name: str
    params: tuple
    layout: Layout


def _one(kind, name, path, args=()):
    return Tensor(name, (path,), Layout(kind, tuple(args)))


# -- RoPE ---------------------------------------------------------------------------------
def _rope(cfg: Config, head_dim: int) -> positions.RoPE:
    """RoPE from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = cfg.get("rope_parameters")
    legacy = cfg.get("rope_scaling")
    if params is not None and legacy is not None:
        raise cfg.error("rope_scaling", "and 'rope_parameters' are both given")
    field = "rope_parameters" if params is not None else "rope_scaling"
    params = dict(params or legacy or {})
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise cfg.error("partial_rotary_factor", "!= 1 (RoPE on part of the head) is not "
                                                 "supported")
    used = set()

    def take(key, default=None):
        used.add(key)
        value = params.get(key)
        return default if value is None else value

    orig = take("original_max_position_embeddings") or cfg.get("max_position_embeddings")
    if kind == "default":
        scaling = None
    elif kind == "linear":
        scaling = positions.Linear(float(take("factor")))
    elif kind == "dynamic":
        scaling = positions.DynamicNTK(float(take("factor")), int(orig))
    elif kind == "yarn":
        if take("mscale") is not None or take("mscale_all_dim") is not None:
            raise cfg.error(field, "sets YaRN's 'mscale' / 'mscale_all_dim' (DeepSeek's "
                                   "attention factor), which lcattn does not implement")
        factor = take("factor") or cfg.get("max_position_embeddings") / orig
        scaling = positions.YaRN(float(factor), int(orig), beta_fast=float(take("beta_fast", 32)),
                                 beta_slow=float(take("beta_slow", 1)),
                                 truncate=bool(take("truncate", True)),
                                 attention_factor=take("attention_factor"))
    elif kind == "llama3":
        scaling = positions.Llama3(float(take("factor")),
                                   low_freq_factor=float(take("low_freq_factor", 1.0)),
                                   high_freq_factor=float(take("high_freq_factor", 4.0)),
                                   original_length=int(orig))
    else:
        raise cfg.error(field, f"has rope type {kind!r}; supported: default, linear, dynamic, "
                               "yarn, llama3")
    extra = sorted(set(params) - used - {"partial_rotary_factor"})
    if extra:
        raise cfg.error(field, f"has keys lcattn does not implement for rope type {kind!r}: "
                               f"{extra}")
    if head_dim % 2:
        raise cfg.error("head_dim", f"= {head_dim} must be even for RoPE")
    return positions.RoPE(theta=theta, scaling=scaling)


# -- Llama family -------------------------------------------------------------------------
def llama(cfg: Config, arch: str) -> tuple[dict, list[Tensor]]:
    """``(DecoderLM kwargs, tensors)`` of a Llama / Mistral / Qwen2 config."""
    d, n_layers = cfg.require("hidden_size"), cfg.require("num_hidden_layers")
    h = cfg.require("num_attention_heads")
    hkv = cfg.get("num_key_value_heads", h)
    dh = cfg.get("head_dim", d // h)
    cfg.expect("hidden_act", ("silu",), "silu")
    cfg.expect("mlp_bias", (False,), False)
    qwen2 = arch == "Qwen2ForCausalLM"
    attention_bias = cfg.expect("attention_bias", (False, True), False)
    window = cfg.get("sliding_window")
    if qwen2:
        cfg.expect("use_sliding_window", (False,), False)
        window = None   # transformers ignores it unless use_sliding_window
    elif arch == "LlamaForCausalLM" and window is not None:
        raise cfg.error("sliding_window", "is not a Llama field")
    layer_types = cfg.get("layer_types") or []
    kind = "sliding_attention" if window is not None else "full_attention"
    for i, t in enumerate(layer_types):
        if t != kind:
            raise cfg.error("layer_types", f"[{i}] = {t!r}; lcattn loads models whose layers "
                                           f"are all {kind!r}")
    mask = masks.Causal() if window is None else masks.Local(int(window))
    spec = AttentionSpec(mask=mask, normalizer=normalizers.Softmax(), position=_rope(cfg, dh))
    conventions = Conventions(scale_embeddings=False, norm_eps=float(cfg.get("rms_norm_eps",
                                                                             1e-6)),
                              qkv_bias=qwen2 or attention_bias, out_bias=attention_bias)
    tied = bool(cfg.get("tie_word_embeddings", False))
    kwargs = dict(vocab_size=cfg.require("vocab_size"), d_model=d, num_heads=h,
                  num_kv_heads=hkv, head_dim=dh, mlp_dim=cfg.require("intermediate_size"),
                  layer_pattern=("attn",) * n_layers, attention_specs=spec,
                  tie_embeddings=tied, conventions=conventions)
    tensors = [_one("same", "model.embed_tokens.weight", ("embedding",)),
               _one("same", "model.norm.weight", ("final_norm", "scale"))]
    if not tied:
        tensors.append(_one("transposed", "lm_head.weight", ("head",)))
    for i in range(n_layers):
        pre, blk = f"model.layers.{i}.", ("blocks", i)
        att, mlp = pre + "self_attn.", pre + "mlp."
        tensors += [
            _one("same", pre + "input_layernorm.weight", blk + ("mixer_norm", "scale")),
            _one("same", pre + "post_attention_layernorm.weight", blk + ("mlp_norm", "scale")),
            _one("linear", att + "q_proj.weight", blk + ("mixer", "wq"), (h, dh)),
            _one("linear", att + "k_proj.weight", blk + ("mixer", "wk"), (hkv, dh)),
            _one("linear", att + "v_proj.weight", blk + ("mixer", "wv"), (hkv, dh)),
            _one("linear_out", att + "o_proj.weight", blk + ("mixer", "wo"), (h, dh)),
            _one("transposed", mlp + "gate_proj.weight", blk + ("mlp", "w_gate")),
            _one("transposed", mlp + "up_proj.weight", blk + ("mlp", "w_up")),
            _one("transposed", mlp + "down_proj.weight", blk + ("mlp", "w_down"))]
        if conventions.qkv_bias:
            tensors += [_one("same", att + f"{p}_proj.bias", blk + ("mixer", f"b{p}"), (n, dh))
                        for p, n in (("q", h), ("k", hkv), ("v", hkv))]
        if conventions.out_bias:
            tensors.append(_one("same", att + "o_proj.bias", blk + ("mixer", "bo")))
    return kwargs, tensors


# -- Mamba-2 ------------------------------------------------------------------------------
def mamba2(cfg: Config, ssm_options: SSMOptions) -> tuple[dict, list[Tensor]]:
    """``(DecoderLM kwargs, tensors)`` of a ``Mamba2ForCausalLM`` config."""
    d, n_layers = cfg.require("hidden_size"), cfg.require("num_hidden_layers")
    expand, p = cfg.get("expand", 2), cfg.get("head_dim", 64)
    h = cfg.get("num_heads", expand * d // p)
    g, n = cfg.get("n_groups", 1), cfg.get("state_size", 128)
    if h * p != expand * d:
        raise cfg.error("num_heads", f"* head_dim = {h} * {p} must equal expand * hidden_size "
                                     f"= {expand} * {d}")
    cfg.expect("hidden_act", ("silu",), "silu")
    cfg.expect("use_bias", (False,), False)
    cfg.expect("use_conv_bias", (True,), True)
    cfg.expect("norm_before_gate", (False,), False)
    limit = cfg.get("time_step_limit", [0.0, math.inf])
    if isinstance(limit[1], dict):   # transformers writes {"__float__": "Infinity"}
        limit = [limit[0], float(limit[1].get("__float__", "nan"))]
    if tuple(map(float, limit)) != (0.0, math.inf):
        raise cfg.error("time_step_limit", f"= {limit} clamps dt, which lcattn does not "
                                           "implement; supported: (0.0, inf)")
    eps = float(cfg.get("layer_norm_epsilon", 1e-5))
    mcfg = Mamba2Config(head_dim=p, state_dim=n, expand=expand, num_groups=g,
                        conv_width=cfg.get("conv_kernel", 4), chunk_size=cfg.get("chunk_size", 256),
                        options=ssm_options, gated_norm="group", norm_eps=eps)
    tied = bool(cfg.get("tie_word_embeddings", True))
    kwargs = dict(vocab_size=cfg.require("vocab_size"), d_model=d, num_heads=h,
                  num_kv_heads=h, head_dim=p, mlp_dim=0, layer_pattern=("mamba2",) * n_layers,
                  tie_embeddings=tied, mamba2=mcfg,
                  conventions=Conventions(scale_embeddings=False, norm_eps=eps))
    dims = (d, h, p, g, n, mcfg.conv_width)
    tensors = [_one("same", "backbone.embeddings.weight", ("embedding",)),
               _one("same", "backbone.norm_f.weight", ("final_norm", "scale"))]
    if not tied:
        tensors.append(_one("transposed", "lm_head.weight", ("head",)))
    for i in range(n_layers):
        pre, mix = f"backbone.layers.{i}.", ("blocks", i, "mixer")
        m = pre + "mixer."
        tensors += [
            _one("same", pre + "norm.weight", ("blocks", i, "mixer_norm", "scale")),
            Tensor(m + "in_proj.weight", tuple(mix + (k,) for k in ("w_z", "w_x", "w_b", "w_c",
                                                                    "w_dt")),
                   Layout("in_proj", dims)),
            Tensor(m + "conv1d.weight", tuple(mix + (k,) for k in ("conv_x", "conv_b", "conv_c")),
                   Layout("conv", dims)),
            Tensor(m + "conv1d.bias", tuple(mix + (k,) for k in ("conv_x_bias", "conv_b_bias",
                                                                 "conv_c_bias")),
                   Layout("conv_bias", dims)),
            _one("same", m + "A_log", mix + ("a_log",)),
            _one("same", m + "dt_bias", mix + ("dt_bias",)),
            _one("same", m + "D", mix + ("d_skip",)),
            _one("same", m + "norm.weight", mix + ("norm",), (h, p)),
            _one("linear_out", m + "out_proj.weight", mix + ("w_out",), (h, p))]
    return kwargs, tensors


def parse(raw: dict, where: str, ssm_options: SSMOptions) -> tuple[str, dict, list[Tensor]]:
    """``(architecture, DecoderLM kwargs, tensors)`` of a ``config.json``; clear errors for
    unknown architectures and for fields that would change the model."""
    cfg = Config(raw, where)
    archs = cfg.require("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise cfg.error("architectures", f"= {archs!r}; supported: {sorted(ARCHITECTURES)}")
    arch = archs[0]
    if ARCHITECTURES[arch] == "mamba2":
        kwargs, tensors = mamba2(cfg, ssm_options)
    else:
        kwargs, tensors = llama(cfg, arch)
    cfg.finish()
    return arch, kwargs, tensors
