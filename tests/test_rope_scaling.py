"""RoPE scalings equal the forms Hugging Face ``transformers`` computes (YaRN's dimension-index
ramp, Llama 3.1's bands, dynamic NTK), with expected numbers written here from the formulas."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lcattn
from lcattn import masks, positions, sharding


def _plain_inv(d, theta):
    return np.array([theta ** (-2.0 * i / d) for i in range(d // 2)])


def _inv(scaling, d, theta):
    return positions.RoPE(theta=theta, scaling=scaling).frequencies(d)


# ----------------------------------------------------------------------------------------------
# YaRN
# ----------------------------------------------------------------------------------------------
def test_yarn_dimension_index_ramp():
    d, theta, f, orig = 128, 10000.0, 4.0, 2048
    inv = _plain_inv(d, theta)

    def correction_dim(rotations):
        return d * math.log(orig / (2 * math.pi * rotations)) / (2 * math.log(theta))

    low, high = math.floor(correction_dim(32.0)), math.ceil(correction_dim(1.0))
    assert (low, high) == (16, 41)
    want = []
    for i in range(d // 2):
        extrapolate = 1.0 - min(max((i - low) / (high - low), 0.0), 1.0)
        want.append(inv[i] / f * (1 - extrapolate) + inv[i] * extrapolate)
    got, divisor, mscale = _inv(positions.YaRN(f, orig), d, theta)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert divisor == 1.0 and mscale == pytest.approx(0.1 * math.log(f) + 1)

    # guard: the paper's wavelength-ratio ramp (lcattn's old form) is a different function
    ratio = orig * inv / (2 * math.pi)
    gamma = np.clip((ratio - 1.0) / (32.0 - 1.0), 0.0, 1.0)
    old = (1 - gamma) * inv / f + gamma * inv
    assert np.max(np.abs(got / old - 1)) > 0.1

    # truncate=False keeps the unrounded correction dimensions; attention_factor overrides
    got, _, mscale = _inv(positions.YaRN(f, orig, truncate=False, attention_factor=1.5), d,
                          theta)
    low, high = correction_dim(32.0), correction_dim(1.0)
    ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0.0, 1.0)
    np.testing.assert_allclose(got, inv / f * ramp + inv * (1 - ramp), rtol=1e-12)
    assert mscale == 1.5
    assert _inv(positions.YaRN(0.5, orig), d, theta)[2] == 1.0


# ----------------------------------------------------------------------------------------------
# Llama 3.1
# ----------------------------------------------------------------------------------------------
def test_llama3_bands():
    d, theta, f, orig = 128, 500000.0, 8.0, 8192
    want, bands = [], []
    for x in _plain_inv(d, theta):
        wavelength = 2 * math.pi / x
        if wavelength < orig / 4.0:
            want.append(x)
            bands.append("high")
        elif wavelength > orig / 1.0:
            want.append(x / f)
            bands.append("low")
        else:
            smooth = (orig / wavelength - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * x / f + smooth * x)
            bands.append("mid")
    assert {b: bands.count(b) for b in set(bands)} == {"high": 29, "mid": 6, "low": 29}
    got, divisor, mscale = _inv(positions.Llama3(f), d, theta)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert (divisor, mscale) == (1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# dynamic NTK
# ----------------------------------------------------------------------------------------------
def _x(seed, t, d):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((2, t, 3, d)), jnp.float32)


def test_dynamic_ntk_base_follows_the_length():
    d, t, theta, f, orig = 16, 24, 10000.0, 3.0, 64
    rope = positions.RoPE(theta, positions.DynamicNTK(f, orig))
    x, pos = _x(0, t, d), np.broadcast_to(np.arange(t, dtype=np.int32) * 3, (2, t))
    plain = positions.RoPE(theta).rotate(x, pos)
    for length in (1, orig - 1, orig):
        np.testing.assert_array_equal(rope.rotate(x, pos, length), plain)
    for length in (orig + 1, 200):
        base = theta * (f * length / orig - (f - 1)) ** (d / (d - 2))
        want = positions.RoPE(base).rotate(x, pos)
        np.testing.assert_allclose(rope.rotate(x, pos, length), want, atol=2e-5)
        traced = jax.jit(rope.rotate)(x, jnp.asarray(pos), jnp.int32(length))
        np.testing.assert_allclose(traced, want, atol=2e-5)
        assert np.max(np.abs(want - plain)) > 1e-2
    # default length: max(pos) + 1 = 70
    np.testing.assert_array_equal(rope.rotate(x, pos), rope.rotate(x, pos, 70))
    np.testing.assert_array_equal(positions.rotation_length(pos), 70)
    np.testing.assert_array_equal(positions.rotation_length(jnp.asarray(pos)), 70)


SPECS = {"causal": lcattn.AttentionSpec(mask=masks.Causal()),
         "lm_infinite": lcattn.AttentionSpec(mask=masks.Lambda(window=6, n_global=2),
                                             distance_limit=6)}


def _attend(q, k, v, spec, **kw):
    return jax.jit(lambda q, k, v: lcattn.attend(q, k, v, spec, **kw))(
        q, k, v)


@pytest.mark.parametrize("name, backend", [("causal", "reference"), ("lm_infinite", "reference"),
                                           ("lm_infinite", "xla")])
def test_dynamic_ntk_attend_decode_equals_forward(name, backend):
    """One length per call, the queries' own (also for the LM-Infinite sink branch, rotated at
    ``D`` and 0): a full forward over ``T > original_length`` positions is plain RoPE at the
    changed base, the last query decoded alone against all keys is its last row, and keys
    beyond the last query (masked) leave the length alone."""
    b, t, d, theta, f, orig = 2, 40, 16, 10000.0, 2.0, 16
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for h in (4, 2, 2))
    spec = dataclasses.replace(SPECS[name],
                               position=positions.RoPE(theta, positions.DynamicNTK(f, orig)))
    full = _attend(q, k, v, spec, backend=backend)
    base = theta * (f * t / orig - (f - 1)) ** (d / (d - 2))
    static = dataclasses.replace(spec, position=positions.RoPE(base))
    np.testing.assert_allclose(full, _attend(q, k, v, static, backend=backend), atol=1e-4)
    last = _attend(q[:, -1:], k, v, spec, q_positions=np.array([t - 1], np.int32),
                   k_positions=np.arange(t, dtype=np.int32), backend=backend)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)
    # keys past the queries (masked) do not change the length: 30 queries, 40 keys
    head = _attend(q[:, :30], k, v, spec, q_positions=np.arange(30, dtype=np.int32),
                   k_positions=np.arange(t, dtype=np.int32), backend=backend)
    np.testing.assert_allclose(head, _attend(q[:, :30], k[:, :30], v[:, :30], spec,
                                             backend=backend), atol=1e-5)


def test_dynamic_ntk_context_axis():
    """Ring / all-gather shards see only their own positions: refused. ``kv_shards`` (the
    queries whole on every device) is allowed and equals the unsharded call."""
    b, t, d = 1, 32, 8
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, 2, d)), jnp.float32) for _ in range(3))
    spec = lcattn.AttentionSpec(position=positions.RoPE(scaling=positions.DynamicNTK(2.0, 8)))
    mesh = sharding.make_mesh(context=4, devices=jax.devices()[:4])
    for strategy in ("ring", "all_gather"):
        fn = jax.shard_map(lambda q, k, v, s=strategy: lcattn.attend(
            q, k, v, spec, context_axis="context", context_strategy=s, backend="xla"),
            mesh=mesh, in_specs=(P(None, "context"),) * 3, out_specs=P(None, "context"))
        with pytest.raises(ValueError, match="context_axis.*DynamicNTK"):
            fn(q, k, v)
    q_pos, k_pos = np.array([t - 1], np.int32), np.arange(t, dtype=np.int32)
    fn = jax.jit(jax.shard_map(lambda q, k, v, kp: lcattn.attend(
        q, k, v, spec, q_positions=q_pos, k_positions=kp, context_axis="context",
        context_strategy="kv_shards", backend="xla"),
        mesh=mesh, in_specs=(P(), P(None, "context"), P(None, "context"), P("context")),
        out_specs=P()))
    want = _attend(q[:, -1:], k, v, spec, q_positions=q_pos, k_positions=k_pos, backend="xla")
    np.testing.assert_allclose(fn(q[:, -1:], k, v, jnp.asarray(k_pos)), want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, field", [
    (lambda: positions.Llama3(0.0), "factor"),
    (lambda: positions.Llama3(8.0, low_freq_factor=-1.0), "low_freq_factor"),
    (lambda: positions.Llama3(8.0, high_freq_factor=math.inf), "high_freq_factor"),
    (lambda: positions.Llama3(8.0, low_freq_factor=4.0, high_freq_factor=2.0),
     "high_freq_factor"),
    (lambda: positions.Llama3(8.0, original_length=0), "original_length"),
    (lambda: positions.DynamicNTK(-2.0, 64), "factor"),
    (lambda: positions.DynamicNTK(2.0, 64.5), "original_length"),
    (lambda: positions.YaRN(4.0, 64, truncate="yes"), "truncate"),
    (lambda: positions.YaRN(4.0, 64, attention_factor=0.0), "attention_factor"),
    (lambda: positions.YaRN(4.0, 64, beta_fast=1.0, beta_slow=2.0), "beta_fast"),
    (lambda: positions.YaRN(4.0, 64, beta_fast=1.0, beta_slow=0.0), "beta_slow"),
    (lambda: positions.RoPE(scaling="llama3"), "DynamicNTK, YaRN or Llama3"),
])
def test_bad_fields(make, field):
    with pytest.raises(ValueError, match=f"`?{field}`?"):
        make()
