"""Decoding with every attention layer's KV cache sharded over the mesh axis ``context``
(``Attention.extend`` under ``jax.set_mesh``): the same greedy tokens and logits as decoding
on one device, the cache split along its slots, the cache size checked."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lcattn
from lcattn import masks, normalizers, sharding
from lcattn.model import DecoderLM, generate

SPECS = {"causal": lcattn.AttentionSpec(),
         "lambda": lcattn.AttentionSpec(mask=masks.Lambda(window=4, n_global=2),
                                        distance_limit=4),
         "lssa": lcattn.AttentionSpec(normalizer=normalizers.Softplus())}
MESHES = {"cp8": dict(context=8), "dp2_cp4": dict(data=2, context=4)}
PROMPT, NEW = 7, 10  # 17 positions: the full cache is padded to 24 (cp8) / 20 (cp4) slots;
# the prompt is longer than the Λ ring (2 sinks + window 4 = 6 slots, padded to 8)


@functools.cache
def _model(layer_pattern=("attn", "attn")):
    # untied head: greedy decoding of the untrained model does not repeat one token
    return DecoderLM(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                     mlp_dim=64, layer_pattern=layer_pattern, tie_embeddings=False,
                     rngs=nnx.Rngs(0))


def _prompt():
    return jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, PROMPT)), jnp.int32)


def _decode(model, spec, new):
    """Logits ``[B, PROMPT + NEW - 1, V]`` of prefilling the prompt, then one decode step per
    generated token but the last, and the final cache."""
    cache = model.init_cache(2, PROMPT + NEW, attention_override=spec)
    logits, cache = model.prefill(_prompt(), cache, attention_override=spec)
    steps = [np.asarray(logits)]
    for i in range(NEW - 1):
        step, cache = model.decode_step(new[:, i:i + 1], PROMPT + i, cache,
                                        attention_override=spec)
        steps.append(np.asarray(step)[:, None])
    return np.concatenate(steps, axis=1), cache


@functools.cache
def _unsharded(name):
    model, spec = _model(), SPECS[name]
    new = generate(model, _prompt(), NEW, attention_override=spec)
    return np.asarray(new), _decode(model, spec, new)[0]


@pytest.mark.parametrize("name, mesh", [("causal", "dp2_cp4"), ("lambda", "dp2_cp4"),
                                        ("lssa", "cp8")])
def test_sharded_cache_decoding_equals_unsharded(name, mesh):
    want_tokens, want_logits = _unsharded(name)
    assert len(set(want_tokens.ravel().tolist())) > 4  # not one repeated token
    mesh = sharding.make_mesh(**MESHES[mesh])
    n = mesh.shape["context"]
    with jax.set_mesh(mesh):
        tokens = generate(_model(), _prompt(), NEW, attention_override=SPECS[name])
        logits, cache = _decode(_model(), SPECS[name], jnp.asarray(want_tokens))
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    slots = 8 if name == "lambda" else -(-(PROMPT + NEW) // n) * n
    batch = "data" if mesh.shape["data"] > 1 else None
    for layer in cache:
        assert layer.k.shape[1] == slots
        for x in (layer.k, layer.v, layer.positions, layer.segment):
            assert x.sharding.spec[:2] == (batch, "context"), x.sharding
            assert x.sharding.shard_shape(x.shape)[1] == slots // n


def test_mamba2_layers_decode_under_a_context_mesh():
    """Mamba-2's recurrent state has no sequence axis: it is whole on each context device,
    next to a sharded attention cache."""
    model = _model(("attn", "mamba2"))
    want = generate(model, _prompt(), NEW)
    with jax.set_mesh(sharding.make_mesh(data=2, context=4)):
        np.testing.assert_array_equal(generate(model, _prompt(), NEW), want)


def test_cache_slots_must_divide_the_context_size():
    model = _model()
    cache = model.init_cache(2, 13)  # built without the mesh: 13 slots
    with jax.set_mesh(sharding.make_mesh(context=8)):
        assert model.init_cache(2, 13)[0].size == 16  # under the mesh: rounded up
        with pytest.raises(ValueError, match=r"13 slots.*'context' \(size 8\)"):
            model.prefill(_prompt(), cache)
