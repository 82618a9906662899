"""The dense ``reference`` backend against an independent float64 numpy oracle.

Every expected value here is computed from the written contract of ``lcattn.attend`` with plain
numpy in float64, entry by entry (explicit loops over batch, head, query and key), without
calling any lcattn helper: lcattn objects are only constructed to be passed to the API.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lcattn import masks, normalizers, positions
from tests.numpy_oracle import (
    ALIBI_SLOPES,
    HKV,
    HQ,
    MASK_CASES,
    B,
    D,
    T,
    data,
    default_pos,
    np_visible,
    oracle,
    pred_causal,
    pred_full,
    pred_lambda,
    run,
    spec_of,
)
from tests.numpy_oracle import np_rope as np_rope_unscaled_or_linear_ntk


def np_rope(d, theta=10000.0, scaling=None):
    """``(inv_freq [d/2], position divisor, mscale)`` in float64 from the contract.

    Plain / ``("linear", f)`` / ``("ntk", f)``: ``tests.numpy_oracle.np_rope``. Written here,
    one dimension at a time:

    * ``("yarn", f, L, beta_fast, beta_slow[, truncate[, attention_factor]])``: the ramp is
      linear in the dimension index ``i`` (the YaRN authors' code and ``transformers``)
      between the correction dimensions ``d ln(L / (2 pi n)) / (2 ln theta)`` of ``beta_fast``
      (floored) and ``beta_slow`` (ceiled) rotations;
    * ``("llama3", f, low_freq_factor, high_freq_factor, L)``: Llama 3.1's wavelength bands.
    """
    if scaling is None or scaling[0] not in ("yarn", "llama3"):
        return np_rope_unscaled_or_linear_ntk(d, theta, scaling)
    th = float(theta)
    inv = [th ** (-2.0 * i / d) for i in range(d // 2)]
    new = []
    if scaling[0] == "llama3":
        _, factor, low_ff, high_ff, orig = scaling
        for f in inv:
            wavelength = 2.0 * math.pi / f
            if wavelength < orig / high_ff:
                new.append(f)
            elif wavelength > orig / low_ff:
                new.append(f / factor)
            else:
                smooth = (orig / wavelength - low_ff) / (high_ff - low_ff)
                new.append((1.0 - smooth) * f / factor + smooth * f)
        return np.array(new, np.float64), 1.0, 1.0
    factor, orig, beta_fast, beta_slow = scaling[1:5]
    truncate = scaling[5] if len(scaling) > 5 else True
    attention_factor = scaling[6] if len(scaling) > 6 else None
    low = d * math.log(orig / (beta_fast * 2.0 * math.pi)) / (2.0 * math.log(th))
    high = d * math.log(orig / (beta_slow * 2.0 * math.pi)) / (2.0 * math.log(th))
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high = high + 0.001
    for i, f in enumerate(inv):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolate = 1.0 - ramp
        new.append(f / factor * (1.0 - extrapolate) + f * extrapolate)
    if attention_factor is not None:
        mscale = attention_factor
    else:
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return np.array(new, np.float64), 1.0, mscale


# ----------------------------------------------------------------------------------------------
# 0. the oracle's own bookkeeping (N_i of the Lambda mask)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,n_global", [(4, 2), (3, 0), (1, 3), (5, 5)])
def test_oracle_lambda_counts(window, n_global):
    t = 20
    vis = np_visible(pred_lambda(window, n_global), default_pos(1, t), default_pos(1, t))
    for i in range(t):
        expected = min(i + 1, window) + max(0, min(n_global, i + 1 - window))
        assert vis[0, i].sum() == expected


# ----------------------------------------------------------------------------------------------
# 1. softmax
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_name", list(MASK_CASES))
@pytest.mark.parametrize("softcap,scale", [(None, None), (2.0, None), (None, 0.7), (1.5, 1.0)])
def test_softmax_masks(mask_name, softcap, scale):
    make_mask, pred = MASK_CASES[mask_name]
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(1, b, t, t, hq, hkv, d)
    vis = np_visible(pred, default_pos(b, t), default_pos(b, t))
    spec = spec_of(make_mask(), normalizers.Softmax(softcap=softcap, scale=scale))
    got = run(q, k, v, spec)
    want = oracle(q, k, v, vis, default_pos(b, t), default_pos(b, t), softcap=softcap,
                  scale=scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 1), (4, 2), (4, 4)])
def test_softmax_gqa_head_mapping(hq, hkv):
    b, t, d = B, T, D
    q, k, v = data(2, b, t, t, hq, hkv, d)
    vis = np_visible(pred_causal, default_pos(b, t), default_pos(b, t))
    got = run(q, k, v, spec_of(masks.Causal()))
    want = oracle(q, k, v, vis, default_pos(b, t), default_pos(b, t))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("normalizer", ["softmax", "softplus", "reweighted"])
@pytest.mark.parametrize("rope", [False, True])
def test_decode_explicit_positions(normalizer, rope):
    # Tq=3 queries at positions 10..12 against Tk=13 keys at their default positions 0..12.
    b, tq, tk, hq, hkv, d = B, 3, 13, HQ, HKV, D
    q, k, v = data(3, b, tq, tk, hq, hkv, d)
    q_pos = np.broadcast_to(np.arange(10, 13), (b, tq)).astype(np.int32)
    k_pos = default_pos(b, tk)
    norm_obj = {"softmax": normalizers.Softmax(), "softplus": normalizers.Softplus(),
                "reweighted": normalizers.Reweighted()}[normalizer]
    spec = spec_of(masks.Causal(), norm_obj, positions.RoPE() if rope else positions.NoPE())
    got = run(q, k, v, spec, q_positions=jnp.asarray(q_pos))
    vis = np_visible(pred_causal, q_pos, k_pos)
    want = oracle(q, k, v, vis, q_pos, k_pos, norm=normalizer,
                  rope=np_rope(d) if rope else None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_default_positions_with_tq_ne_tk():
    # Without explicit positions both q and k start at 0: query i sees keys 0..i only.
    b, tq, tk, hq, hkv, d = B, 3, 13, HQ, HKV, D
    q, k, v = data(4, b, tq, tk, hq, hkv, d)
    got = run(q, k, v, spec_of(masks.Causal()))
    vis = np_visible(pred_causal, default_pos(b, tq), default_pos(b, tk))
    assert vis.sum(axis=2).tolist() == [[1, 2, 3]] * b
    want = oracle(q, k, v, vis, default_pos(b, tq), default_pos(b, tk))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_softmax_segments_and_per_batch_positions():
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(5, b, t, t, hq, hkv, d)
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 4, 4],
                    [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
    # positions restart in every segment (packing)
    pos = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1],
                    [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]], np.int32)
    spec = spec_of(masks.Causal(), position=positions.RoPE())
    got = run(q, k, v, spec, q_positions=jnp.asarray(pos), k_positions=jnp.asarray(pos),
              q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))
    vis = np_visible(pred_causal, pos, pos, seg, seg)
    want = oracle(q, k, v, vis, pos, pos, rope=np_rope(d))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# 2. LSSA (softplus)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_name", ["causal", "lambda4_2", "composed_lambda", "full",
                                       "chunked4_causal", "sinks_or_local"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_lssa_masks(mask_name, hq, hkv):
    make_mask, pred = MASK_CASES[mask_name]
    b, t, d = B, T, D
    q, k, v = data(6, b, t, t, hq, hkv, d)
    vis = np_visible(pred, default_pos(b, t), default_pos(b, t))
    got = run(q, k, v, spec_of(make_mask(), normalizers.Softplus()))
    want = oracle(q, k, v, vis, default_pos(b, t), default_pos(b, t), norm="softplus")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_lssa_lambda_counts_beyond_window():
    # Lambda(window=4, n_global=2), T=12: N_i = min(i+1, 4) + #sinks outside the window, which
    # reaches 6 from i=5 on; the log(N_i) temperature must use that count.
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(7, b, t, t, hq, hkv, d)
    vis = np_visible(pred_lambda(4, 2), default_pos(b, t), default_pos(b, t))
    assert vis[0].sum(axis=1).tolist() == [1, 2, 3, 4, 5] + [6] * 7
    got = run(q, k, v, spec_of(masks.Lambda(4, 2), normalizers.Softplus()))
    want = oracle(q, k, v, vis, default_pos(b, t), default_pos(b, t), norm="softplus")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("restart_positions", [False, True])
@pytest.mark.parametrize("normalizer", ["softplus", "reweighted"])
def test_lssa_segments_count_same_segment_keys(restart_positions, normalizer):
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(8, b, t, t, hq, hkv, d)
    seg = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2],
                    [5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7]], np.int32)
    if restart_positions:
        pos = np.zeros_like(seg)
        for bb in range(b):
            c = 0
            for i in range(t):
                c = 0 if i == 0 or seg[bb, i] != seg[bb, i - 1] else c + 1
                pos[bb, i] = c
        kw = dict(q_positions=jnp.asarray(pos), k_positions=jnp.asarray(pos))
    else:
        pos = np.array(default_pos(b, t))
        kw = {}
    norm_obj = normalizers.Softplus() if normalizer == "softplus" else normalizers.Reweighted()
    got = run(q, k, v, spec_of(masks.Causal(), norm_obj), q_segment_ids=jnp.asarray(seg),
              kv_segment_ids=jnp.asarray(seg), **kw)
    vis = np_visible(pred_causal, pos, pos, seg, seg)
    want = oracle(q, k, v, vis, pos, pos, norm=normalizer)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_lssa_with_rope_normalizes_after_rotation():
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(9, b, t, t, hq, hkv, d)
    sc = positions.YaRN(4.0, 16)  # mscale must cancel in the cosine
    spec = spec_of(masks.Causal(), normalizers.Softplus(), positions.RoPE(scaling=sc))
    got = run(q, k, v, spec)
    vis = np_visible(pred_causal, default_pos(b, t), default_pos(b, t))
    want = oracle(q, k, v, vis, default_pos(b, t), default_pos(b, t), norm="softplus",
                  rope=np_rope(d, scaling=("yarn", 4.0, 16, 32.0, 1.0)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# 3. LSSAR (reweighted)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [15.0, 2.0])
@pytest.mark.parametrize("warmup", [0, 3, 5])
@pytest.mark.parametrize("mask_name", ["causal", "lambda4_2", "full"])
def test_lssar(p, warmup, mask_name):
    make_mask, pred = MASK_CASES[mask_name]
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(10, b, t, t, hq, hkv, d)
    vis = np_visible(pred, default_pos(b, t), default_pos(b, t))
    spec = spec_of(make_mask(), normalizers.Reweighted(p=p, warmup_rows=warmup))
    got = run(q, k, v, spec)
    want = oracle(q, k, v, vis, default_pos(b, t), default_pos(b, t), norm="reweighted", p=p,
                  warmup=warmup)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p", [15.0, 2.0])
def test_lssar_warmup_uses_query_position(p):
    # 3 queries at positions 1..3 against 13 keys: O_i switches from 0 to 1 between the query at
    # position 2 and the one at position 3 (the query *rows* are 0..2, so a row-index based
    # offset would never switch).
    b, tq, tk, hq, hkv, d = B, 3, 13, HQ, HKV, D
    q, k, v = data(11, b, tq, tk, hq, hkv, d)
    q_pos = np.broadcast_to(np.arange(1, 4), (b, tq)).astype(np.int32)
    k_pos = default_pos(b, tk)
    spec = spec_of(masks.Causal(), normalizers.Reweighted(p=p, warmup_rows=3))
    got = run(q, k, v, spec, q_positions=jnp.asarray(q_pos))
    vis = np_visible(pred_causal, q_pos, k_pos)
    want = oracle(q, k, v, vis, q_pos, k_pos, norm="reweighted", p=p, warmup=3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_lssar_single_visible_key_after_warmup_is_zero():
    # Local(1): every query sees one key, so N_i*A_ij = 1. Rows before warmup keep v_i
    # (R = 1^p), rows from position `warmup_rows` on have R = ReLU(1 - 1)^p = 0 -> exactly 0.
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(12, b, t, t, hq, hkv, d)
    got = run(q, k, v, spec_of(masks.Local(1), normalizers.Reweighted(warmup_rows=3)))
    assert np.all(np.isfinite(got))
    v_rep = np.repeat(v, hq // hkv, axis=2)
    np.testing.assert_allclose(got[:, :3], v_rep[:, :3], rtol=1e-5, atol=1e-6)
    assert np.all(got[:, 3:] == 0.0)


def test_lssar_one_query_against_2_pow_20_keys():
    n, d = 2**20, 4
    rng = np.random.default_rng(13)
    q = rng.standard_normal((1, 1, 1, d))
    k = rng.standard_normal((1, n, 1, d))
    v = rng.standard_normal((1, n, 1, d))
    q_pos = np.array([[n - 1]], np.int32)  # past warmup: O = 1
    spec = spec_of(masks.Full(), normalizers.Reweighted(p=15.0, warmup_rows=3))
    got = run(q, k, v, spec, q_positions=jnp.asarray(q_pos))
    assert np.all(np.isfinite(got))
    # float64, vectorized but straight from the formula, with max-scaling before the power.
    qn = q[0, 0, 0] / np.linalg.norm(q[0, 0, 0])
    kn = k[0, :, 0] / np.linalg.norm(k[0, :, 0], axis=-1, keepdims=True)
    s = math.log(d) * math.log(n) * (kn @ qn)
    sp = np.logaddexp(0.0, s)
    a = sp / sp.sum()
    r = np.maximum(n * a - 1.0, 0.0)
    w = (r / r.max()) ** 15.0
    want = (w @ v[0, :, 0]) / w.sum()
    np.testing.assert_allclose(got[0, 0, 0], want, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# 4. ALiBi
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("mask_name", ["full", "causal"])
def test_alibi_softmax(hq, hkv, mask_name):
    make_mask, pred = MASK_CASES[mask_name]
    b, t, d = B, T, D
    q, k, v = data(14, b, t, t, hq, hkv, d)
    q = q * 0.3  # make the bias the dominant term
    vis = np_visible(pred, default_pos(b, t), default_pos(b, t))
    got = run(q, k, v, spec_of(make_mask(), position=positions.ALiBi()))
    want = oracle(q, k, v, vis, default_pos(b, t), default_pos(b, t),
                  slopes=ALIBI_SLOPES[hq])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_alibi_softcap_after_bias_and_lssa():
    b, t, hq, hkv, d = B, T, 6, HKV, D
    q, k, v = data(15, b, t, t, hq, hkv, d)
    vis = np_visible(pred_full, default_pos(b, t), default_pos(b, t))
    got = run(q, k, v, spec_of(masks.Full(), normalizers.Softmax(softcap=1.5),
                               positions.ALiBi()))
    want = oracle(q, k, v, vis, default_pos(b, t), default_pos(b, t), softcap=1.5,
                  slopes=ALIBI_SLOPES[6])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    got = run(q, k, v, spec_of(masks.Full(), normalizers.Softplus(), positions.ALiBi()))
    want = oracle(q, k, v, vis, default_pos(b, t), default_pos(b, t), norm="softplus",
                  slopes=ALIBI_SLOPES[6])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# 5. RoPE and its scalings
# ----------------------------------------------------------------------------------------------
ROPE_CASES = {
    "plain": (lambda: positions.RoPE(), dict()),
    "theta500": (lambda: positions.RoPE(theta=500.0), dict(theta=500.0)),
    "linear4": (lambda: positions.RoPE(scaling=positions.Linear(4.0)),
                dict(scaling=("linear", 4.0))),
    "ntk8": (lambda: positions.RoPE(scaling=positions.NTK(8.0)), dict(scaling=("ntk", 8.0))),
    "ntk3_theta1000": (lambda: positions.RoPE(theta=1000.0, scaling=positions.NTK(3.0)),
                       dict(theta=1000.0, scaling=("ntk", 3.0))),
    "yarn4_64": (lambda: positions.RoPE(scaling=positions.YaRN(4.0, 64)),
                 dict(scaling=("yarn", 4.0, 64, 32.0, 1.0))),
    "yarn8_32_betas": (lambda: positions.RoPE(
        scaling=positions.YaRN(8.0, 32, beta_fast=16.0, beta_slow=2.0)),
        dict(scaling=("yarn", 8.0, 32, 16.0, 2.0))),
    "yarn4_200_untruncated_af": (lambda: positions.RoPE(theta=500.0, scaling=positions.YaRN(
        4.0, 200, truncate=False, attention_factor=1.3)),
        dict(theta=500.0, scaling=("yarn", 4.0, 200, 32.0, 1.0, False, 1.3))),
    "llama3_8_1000": (lambda: positions.RoPE(scaling=positions.Llama3(8.0, original_length=1000)),
                      dict(scaling=("llama3", 8.0, 1.0, 4.0, 1000))),
}


@pytest.mark.parametrize("rope_name", list(ROPE_CASES))
@pytest.mark.parametrize("d", [D, 16])
def test_rope_softmax_full(rope_name, d):
    make_pos, rope_kw = ROPE_CASES[rope_name]
    b, t, hq, hkv = B, T, HQ, HKV
    q, k, v = data(16, b, t, t, hq, hkv, d)
    rng = np.random.default_rng(17)
    # scattered, unsorted positions (Full mask: only the rotation depends on them)
    q_pos = np.stack([rng.permutation(48)[:t] for _ in range(b)]).astype(np.int32)
    k_pos = np.stack([rng.permutation(48)[:t] for _ in range(b)]).astype(np.int32)
    got = run(q, k, v, spec_of(masks.Full(), position=make_pos()),
              q_positions=jnp.asarray(q_pos), k_positions=jnp.asarray(k_pos))
    vis = np_visible(pred_full, q_pos, k_pos)
    want = oracle(q, k, v, vis, q_pos, k_pos, rope=np_rope(d, **rope_kw))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_rope_rotation_actually_matters():
    # Guard: the RoPE expectation must differ from the NoPE one on the same data.
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(18, b, t, t, hq, hkv, d)
    got_rope = run(q, k, v, spec_of(masks.Full(), position=positions.RoPE()))
    got_nope = run(q, k, v, spec_of(masks.Full(), position=positions.NoPE()))
    assert np.max(np.abs(got_rope - got_nope)) > 1e-2


@pytest.mark.parametrize("rope_name", list(ROPE_CASES))
@pytest.mark.parametrize("shift", [7, 40])
def test_rope_relative_shift_invariance(rope_name, shift):
    make_pos, _ = ROPE_CASES[rope_name]
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(19, b, t, t, hq, hkv, d)
    spec = spec_of(masks.Causal(), position=make_pos())
    pos = default_pos(b, t).astype(np.int32)
    base = run(q, k, v, spec, q_positions=jnp.asarray(pos), k_positions=jnp.asarray(pos))
    moved = run(q, k, v, spec, q_positions=jnp.asarray(pos + shift),
                k_positions=jnp.asarray(pos + shift))
    np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 6. LM-Infinite distance limit
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalizer", ["softmax", "softplus", "reweighted"])
@pytest.mark.parametrize("pos_kind", ["rope", "alibi"])
def test_lm_infinite(normalizer, pos_kind):
    window, n_global, limit = 4, 2, 5
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(20, b, t, t, hq, hkv, d)
    norm_obj = {"softmax": normalizers.Softmax(), "softplus": normalizers.Softplus(),
                "reweighted": normalizers.Reweighted()}[normalizer]
    pos_obj = positions.RoPE() if pos_kind == "rope" else positions.ALiBi()
    spec = spec_of(masks.Lambda(window, n_global), norm_obj, pos_obj, distance_limit=limit)
    got = run(q, k, v, spec)
    pos = default_pos(b, t)
    vis = np_visible(pred_lambda(window, n_global), pos, pos)
    kw = dict(rope=np_rope(d)) if pos_kind == "rope" else dict(slopes=ALIBI_SLOPES[hq])
    want = oracle(q, k, v, vis, pos, pos, norm=normalizer, lm_inf=(window, limit), **kw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-5)
    # ... and the distance limit changes the result (sinks are scored differently).
    plain = oracle(q, k, v, vis, pos, pos, norm=normalizer, **kw)
    assert np.max(np.abs(plain - want)) > 1e-3


def test_lm_infinite_decode_positions():
    window, n_global, limit = 4, 2, 5
    b, tq, tk, hq, hkv, d = B, 3, 13, HQ, HKV, D
    q, k, v = data(21, b, tq, tk, hq, hkv, d)
    q_pos = np.array([[10, 11, 12], [6, 9, 12]], np.int32)
    k_pos = default_pos(b, tk)
    spec = spec_of(masks.Lambda(window, n_global), normalizers.Softmax(), positions.RoPE(),
                   distance_limit=limit)
    got = run(q, k, v, spec, q_positions=jnp.asarray(q_pos))
    vis = np_visible(pred_lambda(window, n_global), q_pos, k_pos)
    want = oracle(q, k, v, vis, q_pos, k_pos, rope=np_rope(d), lm_inf=(window, limit))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_lm_infinite_explicit_entry_by_entry():
    # A second, fully spelled-out version: per (batch, head) score matrix built entry by entry
    # with the two-branch definition, then a masked softmax.
    window, n_global, limit = 4, 2, 5
    b_, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(22, b_, t, t, hq, hkv, d)
    spec = spec_of(masks.Lambda(window, n_global), normalizers.Softmax(), positions.RoPE(),
                   distance_limit=limit)
    got = run(q, k, v, spec)
    inv = np.array([10000.0 ** (-2.0 * i / d) for i in range(d // 2)])

    def rot(x, pos):
        a = pos * inv
        return np.concatenate([x[:d // 2] * np.cos(a) - x[d // 2:] * np.sin(a),
                               x[d // 2:] * np.cos(a) + x[:d // 2] * np.sin(a)])

    for b in range(b_):
        for h in range(hq):
            g = h // (hq // hkv)
            scores = np.full((t, t), -np.inf)
            for i in range(t):
                for j in range(t):
                    if j > i:
                        continue
                    if i - j < window:
                        scores[i, j] = rot(q[b, i, h], i) @ rot(k[b, j, g], j) / math.sqrt(d)
                    elif j < n_global:
                        scores[i, j] = rot(q[b, i, h], limit) @ k[b, j, g] / math.sqrt(d)
            w = np.exp(scores - scores.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            np.testing.assert_allclose(got[b, :, h], w @ v[b, :, g], rtol=1e-5, atol=2e-5)
