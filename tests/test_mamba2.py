"""Mamba-2 layer and DecoderLM "mamba2" layers: packing, decoding, options, configuration."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from experiments import train as train_lib
from lcattn import ssm
from lcattn.layers import LOGICAL_AXES, Mamba2, Mamba2Cache, Mamba2Config
from lcattn.model import DecoderLM, count_params, generate

V, D = 64, 16
CFG = Mamba2Config(head_dim=8, state_dim=4, num_groups=2, chunk_size=4)   # 4 heads, 2 groups
WINDOW = Mamba2Config(head_dim=8, state_dim=4, chunk_size=4, options=ssm.SSMOptions(window=4))
CLIP = Mamba2Config(head_dim=8, state_dim=4, chunk_size=4,
                    options=ssm.SSMOptions(state_clip=0.5, decay_scale=2.0))


def make(pattern=("mamba2", "mamba2"), config=CFG, seed=0, **kw):
    return DecoderLM(vocab_size=V, d_model=D, num_heads=2, num_kv_heads=1, head_dim=8,
                     mlp_dim=32, layer_pattern=pattern, mamba2=config, rngs=nnx.Rngs(seed),
                     **kw)


@nnx.jit
def forward(model, tokens, positions=None, segment_ids=None):
    return model(tokens, positions=positions, segment_ids=segment_ids)


def tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def test_layer_shapes_params_and_logical_axes():
    layer = Mamba2(D, CFG, rngs=nnx.Rngs(0))
    h, p, g, n, w = 4, 8, 2, 4, 4
    expect = (2 * D * h * p + 2 * D * g * n + D * h + w * (h * p + 2 * g * n)
              + (h * p + 2 * g * n) + 3 * h + h * p + h * p * D)
    assert count_params(layer) == expect
    x = jax.random.normal(jax.random.key(0), (2, 9, D))
    y = nnx.jit(lambda layer, x: layer(x))(layer, x)
    assert y.shape == (2, 9, D) and np.isfinite(np.asarray(y)).all()
    params = nnx.state(layer, nnx.Param)
    for path, var in jax.tree.leaves_with_path(params, is_leaf=lambda v: isinstance(
            v, nnx.Variable)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var[...].ndim and set(names) <= set(LOGICAL_AXES) | {None}, path
    with nn.logical_axis_rules([("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", None),
                                ("head_dim", None)]):
        specs = nnx.get_partition_spec(params)
    assert specs["w_x"].get_value() == jax.P("fsdp", "tensor", None)
    assert specs["conv_b"].get_value() == jax.P(None, None, None)
    a = -np.exp(np.asarray(layer.a_log[...]))
    dt = np.log1p(np.exp(np.asarray(layer.dt_bias[...])))
    assert (a <= -1).all() and (a >= -16).all() and (dt >= 1e-3 - 1e-7).all() and (dt <= 0.1).all()


def test_packed_documents_equal_separate_runs():
    a, b, c = tokens(1, 7, seed=1), tokens(1, 3, seed=2), tokens(1, 6, seed=3)
    packed = jnp.concatenate([a, b, c], axis=1)
    seg = jnp.asarray([[1] * 7 + [2] * 3 + [3] * 6], jnp.int32)
    pos = jnp.asarray([list(range(7)) + list(range(3)) + list(range(6))], jnp.int32)
    model = make(("mamba2", "attn"), seed=1)
    out = np.asarray(forward(model, packed, pos, seg))
    # the documents alone, one per row, right-padded (padding comes later, so it is never seen)
    alone = np.asarray(forward(model, jnp.concatenate(
        [jnp.pad(d, ((0, 0), (0, 7 - d.shape[1]))) for d in (a, b, c)], axis=0)))
    for row, (lo, hi) in enumerate(((0, 7), (7, 10), (10, 16))):
        np.testing.assert_allclose(out[0, lo:hi], alone[row, :hi - lo], atol=1e-5)


def _decode_all(model, x, prefill_len):
    b, t = x.shape
    cache = model.init_cache(b, t)
    logits, cache = model.prefill(x[:, :prefill_len], cache)
    steps = [np.asarray(logits)]
    for i in range(prefill_len, t):
        logits, cache = model.decode_step(x[:, i:i + 1], i, cache)
        steps.append(np.asarray(logits)[:, None])
    return np.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("config", [CFG, WINDOW, CLIP], ids=["plain", "window", "state_clip"])
def test_prefill_and_decode_match_forward(config):
    model = make(("mamba2", "attn"), config=config, seed=4)
    x = tokens(2, 11, seed=4)
    want = np.asarray(forward(model, x))
    got, cache = _decode_all(model, x, prefill_len=6)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert isinstance(cache[0], Mamba2Cache)
    assert cache[0].ssm.ring_x.shape[1] == config.options.ring_size
    if config is WINDOW:
        new = generate(model, x[:, :5], 6)
        full = forward(model, jnp.concatenate([x[:, :5], new], axis=1))
        np.testing.assert_array_equal(np.argmax(full[:, 4:-1], axis=-1), new)


def test_mitigations_change_long_range_outputs_only():
    """A window of 4 tokens keeps positions < 4 unchanged; a decay scale changes everything."""
    x = tokens(1, 12, seed=5)
    base = np.asarray(forward(make(config=CFG, seed=5), x))
    windowed = Mamba2Config(head_dim=8, state_dim=4, num_groups=2, chunk_size=4,
                            options=ssm.SSMOptions(window=4))
    got = np.asarray(forward(make(config=windowed, seed=5), x))
    np.testing.assert_allclose(got[:, :4], base[:, :4], atol=1e-5)
    assert not np.allclose(got[:, 4:], base[:, 4:], atol=1e-3)
    scaled = Mamba2Config(head_dim=8, state_dim=4, num_groups=2, chunk_size=4,
                          options=ssm.SSMOptions(decay_scale=3.0))
    assert not np.allclose(np.asarray(forward(make(config=scaled, seed=5), x)), base, atol=1e-3)


def test_chunked_sequential_and_pallas_layers_agree_in_value_and_gradient():
    x = jax.random.normal(jax.random.key(6), (2, 10, D))
    seg = jnp.asarray([[1] * 4 + [2] * 6, [1] * 10], jnp.int32)
    layers = {impl: Mamba2(D, Mamba2Config(head_dim=8, state_dim=4, chunk_size=4, impl=impl),
                           rngs=nnx.Rngs(6)) for impl in ("chunked", "sequential", "pallas")}

    def loss_and_grad(layer):
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

        @jax.jit
        def f(p):
            return jnp.sum(nnx.merge(graphdef, p, rest)(x, segment_ids=seg) ** 2)
        return jax.value_and_grad(f)(params)

    ls, gs = loss_and_grad(layers["sequential"])
    for impl in ("chunked", "pallas"):
        loss, grads = loss_and_grad(layers[impl])
        np.testing.assert_allclose(loss, ls, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(gs)):
            assert np.isfinite(np.asarray(a)).all()
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def test_bfloat16_model():
    model = make(("mamba2", "attn"), dtype=jnp.bfloat16)
    logits = forward(model, tokens(1, 8))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    cache = model.init_cache(1, 8)
    assert cache[0].conv.dtype == jnp.bfloat16 and cache[0].ssm.h.dtype == jnp.float32


@pytest.mark.parametrize("kwargs, match", [
    ({"head_dim": 0}, "head_dim.*integer >= 1"),
    ({"impl": "triton"}, "impl.*'auto', 'chunked', 'sequential', 'pallas'"),
    ({"options": ssm.SSMOptions(window=8), "impl": "pallas"}, "not supported by impl='pallas'"),
    ({"options": {"window": 8}}, "options.*SSMOptions"),
    ({"options": ssm.SSMOptions(window=6), "chunk_size": 4}, r"window.*\(6\).*chunk_size.*\(4\)"),
    ({"options": ssm.SSMOptions(state_clip=1.0), "impl": "chunked"}, "state_clip.*sequential"),
])
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2Config(**kwargs)


def test_bad_layer_sizes_raise():
    with pytest.raises(ValueError, match=r"expand \* d_model \(32\).*head_dim \(12\)"):
        Mamba2(D, Mamba2Config(head_dim=12), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"heads \(4.*num_groups \(3\)"):
        Mamba2(D, Mamba2Config(head_dim=8, num_groups=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'mamba9'.*\['mamba2'\]"):
        make(("mamba2", "mamba9"))
    with pytest.raises(ValueError, match="mamba2.*Mamba2Config"):
        make(config={"head_dim": 8})
    with pytest.raises(ValueError, match="Mamba2Cache"):
        Mamba2(D, CFG, rngs=nnx.Rngs(0)).extend(jnp.zeros((1, 1, D)), cache=None)


def test_build_model_repeats_the_pattern_and_takes_the_mamba2_group():
    options = ssm.SSMOptions(decay_scale=1.5, window=64)
    model = train_lib.build_model(vocab_size=V, d_model=16, num_heads=2, num_layers=4,
                                  mlp_dim=16, layer_pattern=("mamba2", "attn"),
                                  mamba2=Mamba2Config(state_dim=8, options=options))
    assert model.layer_pattern == ("mamba2", "attn") * 2
    mixer = model.blocks[0].mixer
    # head_dim=None: as many SSM heads (2) as attention heads, width expand * 16 / 2
    assert mixer.w_x.shape == (16, 2, 16) and mixer.w_b.shape == (16, 1, 8)
    assert mixer.config.head_dim == 16 and mixer.config.options == options
    with pytest.raises(ValueError, match="layer_pattern.*divides num_layers"):
        train_lib.build_model(num_layers=3, layer_pattern=("mamba2", "attn"))
    with pytest.raises(ValueError, match="mamba2.*Mamba2Config"):
        train_lib.build_model(layer_pattern=("mamba2",), mamba2=options)
    with pytest.raises(ValueError, match="head_dim=None.*3 \\* 16.*multiple of 5"):
        DecoderLM(vocab_size=V, d_model=16, num_heads=5, num_kv_heads=5, head_dim=4,
                  mlp_dim=8, layer_pattern=("mamba2",), mamba2=Mamba2Config(expand=3),
                  rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Mamba2: `config.head_dim` is None"):
        Mamba2(D, Mamba2Config(), rngs=nnx.Rngs(0))
