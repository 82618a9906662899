"""Pretrained checkpoints: transformers' own logits on tiny fixtures, refusals, export/import.

The fixtures (``tests/fixtures/pretrained/``) are tiny random models saved by ``transformers``
with its logits on a fixed input (``make_fixtures.py`` states the versions); neither torch nor
transformers is needed here.
"""
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lcattn import hf_layouts, masks, positions, pretrained, sharding
from lcattn.attention import AttentionSpec
from lcattn.layers import Mamba2Config
from lcattn.model import DecoderLM
from lcattn.ssm import SSMOptions

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained")
NAMES = ["llama_gqa_llama3", "qwen2_bias", "llama_yarn", "llama_dynamic", "mamba2"]


def fixture(name):
    return os.path.join(FIXTURES, name)


def expected(name):
    data = np.load(os.path.join(fixture(name), "expected.npz"))
    return jnp.asarray(data["input_ids"]), data["logits"]


def params(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(name):
    ids, want = expected(name)
    got = pretrained.load(fixture(name))(ids)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-5)


def test_half_rotation_layout_matches_rotate_half_not_interleaved():
    """q = x W_q^T rotated as transformers does (pairs (i, i + d/2)) equals lcattn's rotation of
    the mapped weights; the interleaved convention (pairs (2i, 2i+1)) would not."""
    model = pretrained.load(fixture("qwen2_bias"))
    w = load_file(os.path.join(fixture("qwen2_bias"), "model.safetensors"))
    wq = w["model.layers.0.self_attn.q_proj.weight"]
    bq = w["model.layers.0.self_attn.q_proj.bias"]
    x = np.random.default_rng(0).normal(size=(1, 5, 64)).astype(np.float32)
    q = (x @ wq.T + bq).reshape(1, 5, 4, 16)
    pos = np.arange(5)
    inv = 1e6 ** (-np.arange(0, 16, 2) / 16)
    ang = pos[:, None, None] * inv            # [T, 1, 8]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rotate_half = np.concatenate([-q[..., 8:], q[..., :8]], -1)
    want = q * cos + rotate_half * sin
    mixer = model.blocks[0].mixer
    got = mixer.spec.position.rotate(mixer._qkv(jnp.asarray(x))[0], pos[None])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    pairs = q.reshape(1, 5, 4, 8, 2)
    c, s = np.cos(ang)[..., None], np.sin(ang)[..., None]
    interleaved = np.stack([pairs[..., 0] * c[..., 0] - pairs[..., 1] * s[..., 0],
                            pairs[..., 1] * c[..., 0] + pairs[..., 0] * s[..., 0]], -1)
    assert np.abs(interleaved.reshape(q.shape) - want).max() > 0.1


def test_legacy_rope_scaling_spelling_reads_the_same():
    raw = pretrained.read_config(fixture("llama_gqa_llama3"))
    params_ = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params_.pop("rope_theta")
    raw["rope_scaling"] = dict(params_, type=params_.pop("rope_type"))
    new = hf_layouts.parse(pretrained.read_config(fixture("llama_gqa_llama3")), "new",
                           SSMOptions())[1]
    old = hf_layouts.parse(raw, "old", SSMOptions())[1]
    assert old == new
    assert new["attention_specs"].position == positions.RoPE(10000.0, positions.Llama3(
        8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_length=32))


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7,
                          "rope_theta": 1e4}}, "rope_parameters"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_fields_that_change_the_math_are_refused(change, field):
    raw = dict(pretrained.read_config(fixture("llama_gqa_llama3")), **change)
    with pytest.raises(ValueError, match=f"'{field}'"):
        hf_layouts.parse(raw, "config.json", SSMOptions())


def test_mamba2_fields_that_change_the_math_are_refused():
    raw = pretrained.read_config(fixture("mamba2"))
    for change, field in (({"time_step_limit": [0.0, 0.1]}, "time_step_limit"),
                          ({"use_bias": True}, "use_bias"), ({"num_heads": 4}, "num_heads")):
        with pytest.raises(ValueError, match=f"'{field}'"):
            hf_layouts.parse(dict(raw, **change), "config.json", SSMOptions())


def test_missing_extra_and_misshapen_tensors_are_errors(tmp_path):
    src = fixture("qwen2_bias")
    weights = load_file(os.path.join(src, "model.safetensors"))
    for name, edit, match in (
            ("missing", lambda w: w.pop("model.layers.1.self_attn.k_proj.bias"), "lacks"),
            ("extra", lambda w: w.update({"model.layers.0.self_attn.q_norm.weight":
                                          np.ones(16, np.float32)}), "q_norm"),
            ("shape", lambda w: w.update({"model.norm.weight": np.ones(32, np.float32)}),
             "shape")):
        folder = tmp_path / name
        shutil.copytree(src, folder)
        w = dict(weights)
        edit(w)
        save_file(w, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=match):
            pretrained.load(str(folder))


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "mamba2"])
def test_save_then_load_is_the_identity(tmp_path, name):
    model = pretrained.load(fixture(name))
    pretrained.save(model, str(tmp_path), max_position_embeddings=64, max_shard_bytes=100_000)
    assert (tmp_path / pretrained.INDEX).exists()     # several shards and their index
    again = pretrained.load(str(tmp_path))
    a, b = params(model), params(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert again.blocks[0].mixer.__class__ is model.blocks[0].mixer.__class__
    if name != "mamba2":
        assert again.blocks[0].mixer.spec == model.blocks[0].mixer.spec


def test_lcattn_model_with_embedding_scale_exports_untied_with_equal_logits(tmp_path):
    model = DecoderLM(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=48, layer_pattern=("attn",) * 2, rngs=nnx.Rngs(3))
    pretrained.save(model, str(tmp_path), max_position_embeddings=16)
    config = pretrained.read_config(str(tmp_path))
    assert config["tie_word_embeddings"] is False and config["model_type"] == "llama"
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)), jnp.int32)
    np.testing.assert_allclose(np.asarray(pretrained.load(str(tmp_path))(tokens)),
                               np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)


def test_models_without_a_transformers_equivalent_are_refused(tmp_path):
    kw = dict(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=16,
              rngs=nnx.Rngs(0))
    alibi = AttentionSpec(position=positions.ALiBi())
    for model, match in ((DecoderLM(attention_specs=alibi, **kw), "ALiBi"),
                         (DecoderLM(layer_pattern=("attn", "mamba2"),
                                    mamba2=Mamba2Config(head_dim=8, state_dim=4), **kw),
                          "layer_pattern")):
        with pytest.raises(ValueError, match=match):
            pretrained.save(model, str(tmp_path / "out"))


def test_sharded_load_places_each_weight_with_its_sharding():
    mesh = sharding.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4])
    model = pretrained.load(fixture("llama_gqa_llama3"), mesh=mesh)
    want = sharding.param_shardings(nnx.state(model, nnx.Param), mesh)
    wq = model.blocks[0].mixer.wq[...]
    assert wq.sharding == want["blocks"][0]["mixer"]["wq"]
    assert wq.sharding.spec != jax.sharding.PartitionSpec()      # really split
    plain = params(pretrained.load(fixture("llama_gqa_llama3")))
    got = params(model)
    assert all(np.array_equal(plain[k], got[k]) for k in plain)


def test_bfloat16_load():
    model = pretrained.load(fixture("llama_gqa_llama3"), dtype="bfloat16")
    assert model.blocks[0].mixer.wq[...].dtype == jnp.bfloat16
    ids, want = expected("llama_gqa_llama3")
    np.testing.assert_allclose(np.asarray(model(ids)), want, atol=0.1)
    with pytest.raises(ValueError, match="dtype"):
        pretrained.load(fixture("llama_gqa_llama3"), dtype="int8")


def test_lambda_mask_at_8x_with_constant_cache_equals_reference():
    """LM-Infinite on the imported Llama at 8x max_position_embeddings: prefill + decode with
    the sink + ring-buffer cache equals the dense reference forward over the whole sequence."""
    model = pretrained.load(fixture("llama_gqa_llama3"))
    max_len = pretrained.max_positions(fixture("llama_gqa_llama3"))
    t, new = 8 * max_len, 6
    override = pretrained.KeepPosition(AttentionSpec(mask=masks.Lambda(max_len, 4),
                                                     distance_limit=max_len))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 320, (1, t + new)), jnp.int32)
    want = np.asarray(model(tokens, attention_override=override, backend="reference"))
    cache = model.init_cache(1, t + new, attention_override=override)
    assert cache[0].k.shape[1] == max_len + 4                   # constant: window + sinks
    logits, cache = model.prefill(tokens[:, :t], cache, attention_override=override)
    np.testing.assert_allclose(np.asarray(logits), want[:, :t], rtol=1e-4, atol=1e-4)
    for i in range(t, t + new):
        step, cache = model.decode_step(tokens[:, i:i + 1], i, cache,
                                        attention_override=override)
        np.testing.assert_allclose(np.asarray(step), want[:, i], rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(np.abs(want).max()))


def test_tokenizer_round_trip():
    tok = pretrained.load_tokenizer(fixture("qwen2_bias"))
    text = "The pass key is 12345. Remember it."
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text and max(ids) < 320 and len(ids) < len(text)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        pretrained.load_tokenizer(FIXTURES)
