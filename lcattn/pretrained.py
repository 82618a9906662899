"""Pretrained checkpoints: Hugging Face-format folders <-> ``lcattn.model.DecoderLM``.

A folder holds ``config.json``, the weights as ``*.safetensors`` (one file, or shards listed
in ``model.safetensors.index.json``) and, for text, ``tokenizer.json``::

    model = lcattn.pretrained.load("path/to/Llama-3.2-1B")            # float32 DecoderLM
    tokenizer = lcattn.pretrained.load_tokenizer("path/to/Llama-3.2-1B")
    logits = model(tokens, attention_override=lambda s: dataclasses.replace(
        s, mask=lcattn.masks.Lambda(4096, 10), distance_limit=4096))   # LM-Infinite, no training
    lcattn.pretrained.save(model, "out/")                              # and back

Supported architectures and the fields they read: ``lcattn.hf_layouts`` (Llama, Mistral, Qwen2,
Mamba-2); anything else, and any config field that would change the computation without lcattn
implementing it, is an error naming it. Weights are read with ``safetensors`` (numpy; no torch),
one tensor at a time, cast to ``dtype`` and placed directly with their sharding under a mesh,
so the host never holds more than one tensor beyond what the devices hold.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from lcattn import hf_layouts, masks, normalizers, positions, sharding
from lcattn.attention import AttentionSpec
from lcattn.model import DecoderLM
from lcattn.ssm import SSMOptions

INDEX = "model.safetensors.index.json"
DTYPES = ("float32", "bfloat16", "float16")


def read_config(path: str) -> dict:
    """``path/config.json`` as a dict (errors name the folder)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"lcattn.pretrained: no config.json in {path!r} (expected a "
                                "Hugging Face-format model folder)")
    with open(file) as f:
        return json.load(f)


def _weight_files(path: str) -> dict:
    """``{tensor name: file}`` from the index, or from every ``*.safetensors`` in ``path``."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"lcattn.pretrained: no *.safetensors in {path!r} (PyTorch "
                                "*.bin checkpoints are not read: re-save with "
                                "transformers' save_pretrained)")
    names = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            names.update({k: file for k in f.keys()})
    return names


def _check_tensors(names: dict, tensors, path: str) -> None:
    wanted = {t.name for t in tensors}
    missing = sorted(wanted - set(names))
    extra = sorted(k for k in set(names) - wanted
                   if not k.endswith(hf_layouts.IGNORED_TENSOR_SUFFIXES))
    if missing:
        raise ValueError(f"lcattn.pretrained: {path!r} lacks tensor {missing[0]!r} "
                         f"({len(missing)} missing: {missing[:5]})")
    if extra:
        raise ValueError(f"lcattn.pretrained: {path!r} holds tensor {extra[0]!r} that this "
                         f"architecture does not use ({len(extra)} unexpected: {extra[:5]}); "
                         "refusing rather than dropping weights")


def load(path: str, *, dtype: str = "float32", mesh: Mesh | None = None, rules=None,
         ssm_options: SSMOptions | None = None, backend: str = "auto",
         compute_dtype: str | None = None) -> DecoderLM:
    """The ``DecoderLM`` of the Hugging Face-format folder ``path`` (no tokenizer needed).

    Args:
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the parameters and the compute
        dtype (attention statistics, norms' statistics and logits stay float32).
      compute_dtype: another compute dtype than ``dtype`` (e.g. float32 parameters for
        training, bfloat16 matmuls); None: ``dtype``.
      mesh: place each parameter with its sharding (``lcattn.sharding.param_shardings`` under
        ``rules``; default ``DEFAULT_RULES``) as it is read; None: the default device.
      ssm_options: state-collapse mitigations of Mamba-2 layers (``lcattn.ssm.SSMOptions``).
      backend: the attention layers' ``lcattn.attend`` backend.
    """
    for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype or dtype)):
        if value not in DTYPES:
            raise ValueError(f"lcattn.pretrained.load: `{name}` must be one of {DTYPES}, got "
                             f"{value!r}")
    where = os.path.join(path, "config.json")
    _, kwargs, tensors = hf_layouts.parse(read_config(path), where,
                                          ssm_options or SSMOptions())
    names = _weight_files(path)
    _check_tensors(names, tensors, path)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):  # shapes only
        abstract = nnx.eval_shape(lambda: DecoderLM(**kwargs, backend=backend,
                                                    dtype=jnp.dtype(compute_dtype or dtype),
                                                    rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = {p: v.shape for p, v in nnx.to_flat_state(state)}
    places = None if mesh is None else sharding.param_shardings(state, mesh, rules)
    values, handles = {}, {}
    with contextlib.ExitStack() as stack:
        for t in tensors:
            file = names[t.name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="np"))
            raw = handles[file].get_tensor(t.name)
            parts = _convert(raw, t.layout, jnp.dtype(dtype))   # transposes on the device
            for param_path, part in zip(t.params, parts):
                if part.shape != shapes[param_path]:
                    raise ValueError(f"lcattn.pretrained: tensor {t.name!r} gives "
                                     f"{'.'.join(map(str, param_path))} shape {part.shape}, "
                                     f"expected {shapes[param_path]} from {where}")
                target = places
                for key in param_path:
                    target = None if target is None else target[key]
                if target is not None and jax.process_count() > 1:
                    part = np.asarray(part)   # every process holds it: device_put shards it
                values[param_path] = part if target is None else jax.device_put(part, target)
            del raw, parts
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class KeepPosition:
    """An attention override (``spec -> spec``) that replaces a layer's spec with ``spec`` but
    keeps the layer's own position encoding: a Λ-mask or another normalizer on a pretrained
    model without losing its RoPE theta and scaling. Hashable, so compiled functions that take
    the override as a static argument are reused."""

    spec: AttentionSpec

    def __call__(self, layer_spec: AttentionSpec) -> AttentionSpec:
        return dataclasses.replace(self.spec, position=layer_spec.position)

    def __repr__(self):
        s = self.spec
        return (f"KeepPosition(mask={s.mask!r}, normalizer={s.normalizer!r}, "
                f"distance_limit={s.distance_limit!r}, position=each layer's own)")


@functools.partial(jax.jit, static_argnames=("layout", "dtype"))
def _convert(raw, layout: hf_layouts.Layout, dtype):
    """``layout.split(raw)`` cast to ``dtype``, on the default device (one tensor at a time;
    a compilation per distinct layout and shape)."""
    return tuple(x.astype(dtype) for x in layout.split(raw))


def load_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` of ``path/tokenizer.json``."""
    import tokenizers

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"lcattn.pretrained.load_tokenizer: no tokenizer.json in "
                                f"{path!r}")
    return tokenizers.Tokenizer.from_file(file)


def max_positions(path: str) -> int | None:
    """The folder's ``max_position_embeddings`` (its training length), or None."""
    return read_config(path).get("max_position_embeddings")


# -- writing ------------------------------------------------------------------------------
def _rope_config(rope: positions.RoPE, max_len: int) -> dict:
    out = {"rope_theta": rope.theta}
    sc = rope.scaling
    if sc is None:
        return out
    if isinstance(sc, positions.Linear):
        out["rope_scaling"] = {"rope_type": "linear", "factor": sc.factor}
    elif isinstance(sc, positions.DynamicNTK):
        if sc.original_length != max_len:
            raise ValueError(f"lcattn.pretrained.save: DynamicNTK(original_length="
                             f"{sc.original_length}) must equal max_position_embeddings "
                             f"({max_len}): transformers reads it from there")
        out["rope_scaling"] = {"rope_type": "dynamic", "factor": sc.factor}
    elif isinstance(sc, positions.YaRN):
        out["rope_scaling"] = {"rope_type": "yarn", "factor": sc.factor,
                               "original_max_position_embeddings": sc.original_length,
                               "beta_fast": sc.beta_fast, "beta_slow": sc.beta_slow,
                               "truncate": sc.truncate, "attention_factor": sc.attention_factor}
    elif isinstance(sc, positions.Llama3):
        out["rope_scaling"] = {"rope_type": "llama3", "factor": sc.factor,
                               "low_freq_factor": sc.low_freq_factor,
                               "high_freq_factor": sc.high_freq_factor,
                               "original_max_position_embeddings": sc.original_length}
    else:
        raise ValueError(f"lcattn.pretrained.save: RoPE scaling {sc!r} has no transformers "
                         "equivalent (NTK: use DynamicNTK or a changed theta)")
    return out


def _llama_config(model: DecoderLM, max_len: int) -> dict:
    specs = {b.mixer.spec for b in model.blocks}
    if len(specs) != 1:
        raise ValueError(f"lcattn.pretrained.save: the attention layers have different specs "
                         f"{sorted(map(repr, specs))}; a transformers model has one")
    (spec,) = specs
    if not isinstance(spec.position, positions.RoPE):
        raise ValueError(f"lcattn.pretrained.save: position {spec.position!r}: only RoPE "
                         "models have a transformers architecture here")
    if spec.normalizer != normalizers.Softmax() or spec.distance_limit is not None:
        raise ValueError(f"lcattn.pretrained.save: normalizer {spec.normalizer!r} / "
                         f"distance_limit {spec.distance_limit!r}: transformers models use "
                         "Softmax() without softcap and no distance limit")
    c = model.conventions
    if isinstance(spec.mask, masks.Local) and not (c.qkv_bias or c.out_bias):
        arch, extra = "MistralForCausalLM", {"sliding_window": spec.mask.window}
    elif isinstance(spec.mask, masks.Causal):
        extra = {}
        if c.qkv_bias and not c.out_bias:
            arch = "Qwen2ForCausalLM"
            extra = {"use_sliding_window": False}
        else:
            arch, extra = "LlamaForCausalLM", {"attention_bias": c.out_bias, "mlp_bias": False}
    else:
        raise ValueError(f"lcattn.pretrained.save: mask {spec.mask!r}: transformers models are "
                         "Causal (Llama, Qwen2) or Local (Mistral's sliding window, no biases)")
    attn = model.blocks[0].mixer
    return dict(architectures=[arch], model_type=hf_layouts.MODEL_TYPES[arch],
                hidden_size=model.d_model, intermediate_size=model.blocks[0].mlp.w_up.shape[1],
                num_hidden_layers=len(model.blocks), num_attention_heads=attn.num_heads,
                num_key_value_heads=attn.num_kv_heads, head_dim=attn.head_dim,
                rms_norm_eps=c.norm_eps, hidden_act="silu", max_position_embeddings=max_len,
                **_rope_config(spec.position, max_len), **extra)


def _mamba2_config(model: DecoderLM) -> dict:
    mixer = model.blocks[0].mixer
    cfg = mixer.config
    h, p = mixer.w_x.shape[1:]
    g, n = mixer.w_b.shape[1:]
    if cfg.gated_norm != "group" and g != h:
        raise ValueError("lcattn.pretrained.save: Mamba2Config(gated_norm='head') with "
                         f"num_groups ({g}) != heads ({h}) has no transformers equivalent "
                         "(its gated norm is per group)")
    if cfg.norm_eps != model.conventions.norm_eps:
        raise ValueError(f"lcattn.pretrained.save: the gated norm's eps ({cfg.norm_eps}) must "
                         f"equal the blocks' ({model.conventions.norm_eps}): transformers has "
                         "one layer_norm_epsilon")
    if cfg.options != SSMOptions():
        raise ValueError(f"lcattn.pretrained.save: SSM options {cfg.options!r} are "
                         "evaluation-time mitigations with no transformers field; save the "
                         "model without them (SSMOptions())")
    return dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2",
                hidden_size=model.d_model, num_hidden_layers=len(model.blocks),
                state_size=n, expand=cfg.expand, head_dim=p, num_heads=h, n_groups=g,
                conv_kernel=cfg.conv_width, chunk_size=cfg.chunk_size,
                layer_norm_epsilon=cfg.norm_eps, use_conv_bias=True, use_bias=False,
                hidden_act="silu")


def save(model: DecoderLM, path: str, *, max_position_embeddings: int = 2048,
         max_shard_bytes: int = 4 << 30) -> None:
    """Write ``model`` to ``path`` as a Hugging Face-format folder (``config.json``,
    ``*.safetensors``, float32 or the parameters' dtype), loadable by ``load`` and by
    ``transformers``.

    All-attention models become Llama (Mistral for a ``Local`` mask, Qwen2 with q/k/v biases),
    all-Mamba-2 models (``mlp_dim=0``) ``Mamba2ForCausalLM``; a model with an input embedding
    scale (lcattn's default) is written untied with the scale folded into the input table
    (``embed_tokens = sqrt(d_model) E``, ``lm_head = E`` or the head), so it computes the same
    logits. ``max_position_embeddings``: the length the model was trained at. Anything without
    an equivalent is an error naming it.
    """
    if not isinstance(model, DecoderLM):
        raise ValueError(f"lcattn.pretrained.save: `model` must be a DecoderLM, got "
                         f"{type(model).__name__}")
    kinds = set(model.layer_pattern)
    if kinds == {"attn"}:
        config = _llama_config(model, max_position_embeddings)
    elif kinds == {"mamba2"} and all(b.mlp is None for b in model.blocks):
        config = _mamba2_config(model)
    else:
        raise ValueError(f"lcattn.pretrained.save: layer_pattern {model.layer_pattern} (with "
                         "MLPs: " + str(model.blocks[0].mlp is not None) + ") has no transformers "
                         "architecture: all 'attn' (Llama family) or all 'mamba2' with mlp_dim=0")
    scale = model.conventions.scale_embeddings
    tied = model.head is None and not scale
    embedding = np.asarray(model.embedding[...])
    state = nnx.state(model, nnx.Param)
    flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}
    if scale:   # untie: the input table carries the scale, the head keeps E (or its own)
        flat[("embedding",)] = embedding * np.asarray(math.sqrt(model.d_model), embedding.dtype)
        if model.head is None:
            flat[("head",)] = embedding.T
    if config.get("rope_scaling", {}).get("attention_factor", 0) is None:
        del config["rope_scaling"]["attention_factor"]
    config.update(vocab_size=model.vocab_size, tie_word_embeddings=tied,
                  torch_dtype=str(embedding.dtype))
    _, _, tensors = hf_layouts.parse(dict(config), "the written config", SSMOptions())
    arrays = {t.name: np.ascontiguousarray(t.layout.join(*(flat[p] for p in t.params)))
              for t in tensors}
    os.makedirs(path, exist_ok=True)
    _write_tensors(arrays, path, max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _write_tensors(arrays: dict, path: str, max_shard_bytes: int) -> None:
    shards, current, size = [], {}, 0
    for name, array in arrays.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = array, size + array.nbytes
    shards.append(current)
    for old in glob.glob(os.path.join(path, "*.safetensors")) + [os.path.join(path, INDEX)]:
        if os.path.exists(old):
            os.remove(old)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
                   "weight_map": weight_map}, f, indent=2)
