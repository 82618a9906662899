"""DecoderLM: shapes, configuration errors, per-layer specs, KV-cache decoding, packing, grads."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import lcattn
from lcattn import masks, normalizers
from lcattn.layers import LOGICAL_AXES, Attention
from lcattn.model import DecoderLM, count_params, generate

V, D, H, HKV, DH, F = 64, 32, 4, 2, 8, 64
CAUSAL = lcattn.AttentionSpec()
LAMBDA = lcattn.AttentionSpec(mask=masks.Lambda(window=4, n_global=2), distance_limit=4)
LSSA = lcattn.AttentionSpec(normalizer=normalizers.Softplus())


def make(seed=0, **kw):
    cfg = dict(vocab_size=V, d_model=D, num_heads=H, num_kv_heads=HKV, head_dim=DH, mlp_dim=F)
    cfg.update(kw)
    return DecoderLM(**cfg, rngs=nnx.Rngs(seed))


@functools.partial(nnx.jit, static_argnames=("override", "backend"))
def forward(model, tokens, positions=None, segment_ids=None, override=None, backend=None):
    return model(tokens, positions=positions, segment_ids=segment_ids,
                 attention_override=override, backend=backend)


def tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def test_forward_shapes_and_param_count():
    model = make()
    logits = forward(model, tokens(2, 16))
    assert logits.shape == (2, 16, V) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    per_layer = 2 * D + D * H * DH + 2 * D * HKV * DH + H * DH * D + 3 * D * F
    assert count_params(model) == V * D + 2 * per_layer + D
    assert count_params(make(tie_embeddings=False)) == 2 * V * D + 2 * per_layer + D


def test_bfloat16_activations_float32_logits_and_params():
    model = make(dtype=jnp.bfloat16)
    logits = forward(model, tokens(1, 8))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert model.init_cache(1, 8)[0].k.dtype == jnp.bfloat16


def test_params_carry_logical_axis_names():
    model = make(tie_embeddings=False)
    params = nnx.state(model, nnx.Param)
    seen = set()
    for path, var in jax.tree.leaves_with_path(params, is_leaf=lambda x: isinstance(
            x, nnx.Variable)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim and set(names) <= set(LOGICAL_AXES), (path, names)
        seen.update(names)
    assert seen == set(LOGICAL_AXES)
    rules = [("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
             ("vocab", "tensor"), ("head_dim", None), ("norm", None)]
    with nn.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(params)
    assert specs["blocks"][0]["mixer"]["wq"].get_value() == jax.P("fsdp", "tensor", None)
    assert specs["embedding"].get_value() == jax.P("tensor", "fsdp")


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa, mha = make(), make(num_kv_heads=H)
    assert gqa.blocks[0].mixer.wk.shape == (D, HKV, DH)
    nnx.update(mha, nnx.state(gqa))
    for bg, bm in zip(gqa.blocks, mha.blocks):
        bm.mixer.wk.set_value(jnp.repeat(bg.mixer.wk[...], H // HKV, axis=1))
        bm.mixer.wv.set_value(jnp.repeat(bg.mixer.wv[...], H // HKV, axis=1))
    x = tokens(2, 12)
    np.testing.assert_allclose(forward(gqa, x), forward(mha, x), atol=1e-5, rtol=1e-5)


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match=r"num_heads \(4\).*num_kv_heads \(3\)"):
        make(num_kv_heads=3)
    with pytest.raises(ValueError, match=r"'mamba9'.*\['attn'\]"):
        make(layer_pattern=("attn", "mamba9"))
    with pytest.raises(ValueError, match="3 entries but `layer_pattern` has 2"):
        make(attention_specs=(CAUSAL, CAUSAL, CAUSAL))
    with pytest.raises(ValueError, match="attention_specs"):
        make(attention_specs=(CAUSAL, "causal"))
    with pytest.raises(ValueError, match="backend"):
        make(backend="cuda")
    with pytest.raises(ValueError, match="must return an AttentionSpec"):
        forward(make(), tokens(1, 4), override=lambda spec: None)


def test_per_layer_specs_and_attention_override():
    x = tokens(2, 16)
    causal = make()
    mixed = make(attention_specs=(CAUSAL, lcattn.AttentionSpec(mask=masks.Local(4))))
    assert [b.mixer.spec.mask for b in mixed.blocks] == [masks.Causal(), masks.Local(4)]
    base, out_mixed = forward(causal, x), forward(mixed, x)
    assert np.isfinite(np.asarray(out_mixed)).all()
    assert not np.allclose(base, out_mixed, atol=1e-3)
    # Same parameters (same seed): positions < 4 see the same keys under Local(4).
    np.testing.assert_allclose(out_mixed[:, :4], base[:, :4], atol=1e-5)
    np.testing.assert_allclose(forward(causal, x, override=CAUSAL), base, atol=1e-6)
    assert not np.allclose(forward(causal, x, override=LAMBDA), base, atol=1e-3)
    # A callable override edits each layer's own spec: Local(4) everywhere == a Local model.
    local = lcattn.AttentionSpec(mask=masks.Local(4))
    to_local = lambda spec: dataclasses.replace(spec, mask=masks.Local(4))  # noqa: E731
    np.testing.assert_allclose(forward(causal, x, override=to_local),
                               forward(make(attention_specs=local), x), atol=1e-5)


def _decode_all(model, x, spec, prefill_len, backend=None):
    """Logits ``[B, T, V]``: prefill ``prefill_len`` tokens, then one decode step per token."""
    b, t = x.shape
    cache = model.init_cache(b, t, attention_override=spec)
    steps = []
    if prefill_len:
        logits, cache = model.prefill(x[:, :prefill_len], cache, attention_override=spec,
                                      backend=backend)
        steps.append(np.asarray(logits))
    for i in range(prefill_len, t):
        pos = i if i % 2 else jnp.full((b,), i, jnp.int32)  # scalar and [B] positions
        logits, cache = model.decode_step(x[:, i:i + 1], pos, cache, attention_override=spec,
                                          backend=backend)
        steps.append(np.asarray(logits)[:, None])
    return np.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("spec", [CAUSAL, LAMBDA, LSSA], ids=["causal", "lambda", "lssa"])
def test_decode_matches_forward(spec):
    model = make(seed=1)
    x = tokens(2, 16, seed=1)
    want = np.asarray(forward(model, x, override=spec))
    got, cache = _decode_all(model, x, spec, prefill_len=0)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    got, cache = _decode_all(model, x, spec, prefill_len=10)  # prefill longer than the ring
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    expect_slots = 6 if spec is LAMBDA else 16
    assert all(c.k.shape == (2, expect_slots, HKV, DH) for c in cache)
    assert all(int(c.segment.min()) == 1 for c in cache)


def test_decode_matches_forward_reference_backend_and_mixed_layers():
    specs = (LAMBDA, lcattn.AttentionSpec(mask=masks.Local(3), normalizer=normalizers.Softplus()))
    model = make(seed=2, attention_specs=specs, backend="reference")
    x = tokens(1, 12, seed=2)
    got, cache = _decode_all(model, x, None, prefill_len=3)
    np.testing.assert_allclose(got, forward(model, x), atol=1e-4, rtol=1e-4)
    assert [c.k.shape[1] for c in cache] == [6, 3]


def test_lambda_cache_size_is_constant():
    model = make()
    for max_len in (16, 4096):
        ring = model.init_cache(2, max_len, attention_override=LAMBDA)
        assert all(leaf.shape[1] == 6 for leaf in jax.tree.leaves(ring))
        full = model.init_cache(2, max_len)
        assert all(leaf.shape[1] == max_len for leaf in jax.tree.leaves(full))
    small = model.init_cache(1, 5, attention_override=LAMBDA)  # shorter than the ring
    assert small[0].k.shape[1] == 5 and small[0].window is None
    with pytest.raises(ValueError, match="ring"):
        model.decode_step(tokens(2, 1), 0, model.init_cache(2, 64, attention_override=LAMBDA))


def test_packed_segments_match_separate_documents():
    model = make(seed=3)
    a, b = tokens(1, 6, seed=4), tokens(1, 10, seed=5)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.asarray([[1] * 6 + [2] * 10], jnp.int32)
    pos = jnp.asarray([list(range(6)) + list(range(10))], jnp.int32)
    for spec in (CAUSAL, LSSA):
        out = np.asarray(forward(model, packed, positions=pos, segment_ids=seg, override=spec))
        np.testing.assert_allclose(out[:, :6], forward(model, a, override=spec), atol=1e-5)
        np.testing.assert_allclose(out[:, 6:], forward(model, b, override=spec), atol=1e-5)


def test_gradients_flow_through_split_merge():
    model = make(attention_specs=(CAUSAL, LAMBDA), tie_embeddings=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = tokens(2, 12, seed=6)

    @jax.jit
    def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest)(x[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert np.isfinite(float(loss)) and abs(float(loss) - np.log(V)) < 1.0
    for path, g in jax.tree.leaves_with_path(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, path


@pytest.mark.parametrize("spec", [None, LAMBDA], ids=["causal", "lambda"])
def test_generate_is_greedy(spec):
    model = make(seed=7)
    prompt = tokens(2, 5, seed=7)
    new = generate(model, prompt, 12, attention_override=spec)
    assert new.shape == (2, 12) and new.dtype == jnp.int32
    logits = forward(model, jnp.concatenate([prompt, new], axis=1), override=spec)
    np.testing.assert_array_equal(np.argmax(logits[:, 4:-1], axis=-1), new)
    assert generate(model, prompt, 0).shape == (2, 0)


def test_attention_layer_alone():
    layer = Attention(D, H, HKV, DH, lcattn.AttentionSpec(position=lcattn.positions.ALiBi()),
                      rngs=nnx.Rngs(0), backend="reference")
    x = jax.random.normal(jax.random.key(0), (2, 7, D))
    y = layer(x, positions=jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7)))
    assert y.shape == (2, 7, D)
    np.testing.assert_allclose(layer(x), y, atol=1e-6)  # positions default to arange
    with pytest.raises(ValueError, match=r"num_heads \(6\).*num_kv_heads \(4\)"):
        Attention(D, 6, 4, DH, rngs=nnx.Rngs(0))
