"""The dense ``reference`` backend against an independent float64 numpy oracle.

Every expected value here is computed from the written contract of ``lcattn.attend`` with plain
numpy in float64, entry by entry (explicit loops over batch, head, query and key), without
calling any lcattn helper: lcattn objects are only constructed to be passed to the API.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcattn
from lcattn import masks, normalizers, positions

REF = "reference"
# One standard shape for most tests: eager jax compiles every primitive once per shape, so
# sharing shapes keeps the file fast.
B, T, HQ, HKV, D = 2, 12, 4, 2, 8


# ----------------------------------------------------------------------------------------------
# numpy oracle
# ----------------------------------------------------------------------------------------------
def pred_full(q, k):
    return True


def pred_causal(q, k):
    return k <= q


def pred_local(w):
    return lambda q, k: 0 <= q - k < w


def pred_sinks(n):
    return lambda q, k: k < n


def pred_chunked(c):
    return lambda q, k: q // c == k // c


def pred_lambda(w, g):
    return lambda q, k: k <= q and (q - k < w or k < g)


def np_visible(pred, q_pos, k_pos, q_seg=None, kv_seg=None):
    """bool [B, Tq, Tk] built with explicit loops from a predicate on integer positions."""
    b_, tq = q_pos.shape
    tk = k_pos.shape[1]
    vis = np.zeros((b_, tq, tk), dtype=bool)
    for b in range(b_):
        for i in range(tq):
            for j in range(tk):
                ok = bool(pred(int(q_pos[b, i]), int(k_pos[b, j])))
                if q_seg is not None:
                    ok = ok and int(q_seg[b, i]) == int(kv_seg[b, j])
                vis[b, i, j] = ok
    return vis


def np_rope(d, theta=10000.0, scaling=None):
    """(inv_freq [d/2], position divisor, mscale) in float64 from the contract."""
    th = float(theta)
    if scaling is not None and scaling[0] == "ntk":
        th = th * scaling[1] ** (d / (d - 2))
    inv = np.array([th ** (-2.0 * i / d) for i in range(d // 2)], dtype=np.float64)
    divisor, mscale = 1.0, 1.0
    if scaling is not None and scaling[0] == "linear":
        divisor = float(scaling[1])
    if scaling is not None and scaling[0] == "yarn":
        _, factor, orig_len, beta_fast, beta_slow = scaling
        new = np.empty_like(inv)
        for i in range(d // 2):
            lam = 2.0 * math.pi / inv[i]
            r = orig_len / lam
            gamma = min(max((r - beta_slow) / (beta_fast - beta_slow), 0.0), 1.0)
            new[i] = (1.0 - gamma) * inv[i] / factor + gamma * inv[i]
        inv = new
        mscale = 0.1 * math.log(factor) + 1.0
    return inv, divisor, mscale


def np_rotate(x, pos, rope):
    """Half-split rotation of one head vector x [D] at integer position pos."""
    if rope is None:
        return x
    inv, divisor, mscale = rope
    angle = (float(pos) / divisor) * inv
    c, s = np.cos(angle), np.sin(angle)
    h = x.shape[0] // 2
    x1, x2 = x[:h], x[h:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s]) * mscale


def oracle(q, k, v, visible, q_pos, k_pos, *, norm="softmax", scale=None, softcap=None,
           p=15.0, warmup=3, rope=None, slopes=None, lm_inf=None):
    """Float64 attention from the contract, one (batch, head, query, key) entry at a time.

    norm: "softmax", "softplus" (LSSA) or "reweighted" (LSSAR).
    rope: output of np_rope(...) or None.  slopes: ALiBi slopes [Hq] or None.
    lm_inf: (window, D) for LM-Infinite's distance limit, or None.
    """
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    b_, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    out = np.zeros((b_, tq, hq, dv), np.float64)
    for b in range(b_):
        for h in range(hq):
            g = h // group
            for i in range(tq):
                idx = np.nonzero(visible[b, i])[0]
                n = len(idx)
                if n == 0:
                    continue
                s = np.empty(n, np.float64)
                for t, j in enumerate(idx):
                    pq, pk = int(q_pos[b, i]), int(k_pos[b, j])
                    if lm_inf is not None and pq - pk >= lm_inf[0]:
                        pq, pk = lm_inf[1], 0
                    qv = np_rotate(q[b, i, h], pq, rope)
                    kv = np_rotate(k[b, j, g], pk, rope)
                    if norm == "softmax":
                        sc = scale if scale is not None else 1.0 / math.sqrt(d)
                        val = sc * float(qv @ kv)
                    else:
                        cos = float(qv @ kv) / (np.linalg.norm(qv) * np.linalg.norm(kv))
                        val = math.log(d) * math.log(n) * cos
                    if slopes is not None:
                        val += -slopes[h] * abs(pq - pk)
                    if norm == "softmax" and softcap is not None:
                        val = softcap * math.tanh(val / softcap)
                    s[t] = val
                if norm == "softmax":
                    w = np.exp(s - s.max())
                    w = w / w.sum()
                else:
                    sp = np.logaddexp(0.0, s)  # softplus
                    a = sp / sp.sum()
                    if norm == "reweighted":
                        o = 0.0 if int(q_pos[b, i]) < warmup else 1.0
                        r = np.maximum(n * a - o, 0.0)
                        if r.max() <= 0.0:
                            continue
                        w = (r / r.max()) ** p
                        w = w / w.sum()
                    else:
                        w = a
                out[b, i, h] = w @ v[b, idx, g]
    return out


def data(seed, b, tq, tk, hq, hkv, d, dv=None):
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    q = rng.standard_normal((b, tq, hq, d))
    k = rng.standard_normal((b, tk, hkv, d))
    v = rng.standard_normal((b, tk, hkv, dv))
    return q, k, v


def f32(x):
    return jnp.asarray(x, jnp.float32)


def default_pos(b, t):
    return np.broadcast_to(np.arange(t), (b, t))


def run(q, k, v, spec, **kw):
    out = lcattn.attend(f32(q), f32(k), f32(v), spec, backend=REF, **kw)
    assert out.dtype == jnp.float32
    assert out.shape == q.shape[:3] + (v.shape[3],)
    return np.asarray(out, np.float64)


def spec_of(mask, normalizer=None, position=None, distance_limit=None):
    return lcattn.AttentionSpec(
        mask=mask,
        normalizer=normalizers.Softmax() if normalizer is None else normalizer,
        position=positions.NoPE() if position is None else position,
        distance_limit=distance_limit)


MASK_CASES = {
    "full": (lambda: masks.Full(), pred_full),
    "causal": (lambda: masks.Causal(), pred_causal),
    "local3": (lambda: masks.Local(3), pred_local(3)),
    "chunked4": (lambda: masks.Chunked(4), pred_chunked(4)),
    "chunked4_causal": (lambda: masks.Chunked(4) & masks.Causal(),
                        lambda q, k: q // 4 == k // 4 and k <= q),
    "lambda4_2": (lambda: masks.Lambda(4, 2), pred_lambda(4, 2)),
    "composed_lambda": (lambda: masks.Causal() & (masks.Local(3) | masks.Sinks(2)),
                        pred_lambda(3, 2)),
    "sinks_or_local": (lambda: masks.Sinks(2) | masks.Local(2),
                       lambda q, k: k < 2 or 0 <= q - k < 2),
}


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
ALIBI_SLOPES = {
    8: [2.0**-1, 2.0**-2, 2.0**-3, 2.0**-4, 2.0**-5, 2.0**-6, 2.0**-7, 2.0**-8],
    # n=4: 2^(-8h/4) = 2^-2, 2^-4, 2^-6, 2^-8; then entries 0 and 2 of the 2n=8 list.
    6: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3],
    4: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8],
    # n=2: 2^-4, 2^-8; then entry 0 of the n=4 list.
    3: [2.0**-4, 2.0**-8, 2.0**-2],
    2: [2.0**-4, 2.0**-8],
}


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


# ----------------------------------------------------------------------------------------------
# 7. edge cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalizer,warmup", [("softmax", 3), ("softplus", 3),
                                               ("reweighted", 3), ("reweighted", 0)])
@pytest.mark.parametrize("pos_kind", ["nope", "rope", "alibi"])
def test_single_token(normalizer, warmup, pos_kind):
    b, t, hq, hkv, d = B, 1, HQ, HKV, D
    q, k, v = data(23, b, t, t, hq, hkv, d)
    norm_obj = {"softmax": normalizers.Softmax(), "softplus": normalizers.Softplus(),
                "reweighted": normalizers.Reweighted(warmup_rows=warmup)}[normalizer]
    pos_obj = {"nope": positions.NoPE(), "rope": positions.RoPE(),
               "alibi": positions.ALiBi()}[pos_kind]
    got = run(q, k, v, spec_of(masks.Causal(), norm_obj, pos_obj))
    pos = default_pos(b, t)
    vis = np_visible(pred_causal, pos, pos)
    want = oracle(q, k, v, vis, pos, pos, norm=normalizer, warmup=warmup)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if normalizer == "reweighted" and warmup == 0:
        assert np.all(got == 0.0)  # N=1, O=1: R = 0
    else:
        np.testing.assert_allclose(got, np.repeat(v, hq // hkv, axis=2), rtol=1e-6, atol=1e-6)


NORMS = {"softmax": normalizers.Softmax, "softplus": normalizers.Softplus,
         "reweighted": normalizers.Reweighted}


def _grads(q, k, v, spec, **kw):
    def loss(q_, k_, v_):
        return jnp.sum(lcattn.attend(q_, k_, v_, spec, backend=REF, **kw) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2))(f32(q), f32(k), f32(v))


@pytest.mark.parametrize("normalizer", list(NORMS))
@pytest.mark.parametrize("pos_kind", ["nope", "rope", "alibi"])
def test_empty_row_from_segments(normalizer, pos_kind):
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(24, b, t, t, hq, hkv, d)
    q_seg = np.array([[0, 0, 0, 3, 1, 1, 1, 3, 2, 2, 2, 2],  # segment 3 has no keys
                      [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
    kv_seg = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
                       [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
    pos_obj = {"nope": positions.NoPE(), "rope": positions.RoPE(),
               "alibi": positions.ALiBi()}[pos_kind]
    spec = spec_of(masks.Full(), NORMS[normalizer](), pos_obj)
    kw = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
    got = run(q, k, v, spec, **kw)
    assert np.all(np.isfinite(got))
    assert np.all(got[0, 3] == 0.0) and np.all(got[0, 7] == 0.0)
    pos = default_pos(b, t)
    vis = np_visible(pred_full, pos, pos, q_seg, kv_seg)
    want = oracle(q, k, v, vis, pos, pos, norm=normalizer,
                  rope=np_rope(d) if pos_kind == "rope" else None,
                  slopes=ALIBI_SLOPES[hq] if pos_kind == "alibi" else None)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-5)
    for g in _grads(q, k, v, spec, **kw):
        assert np.all(np.isfinite(np.asarray(g)))
    # the empty rows contribute nothing: their q gradient is zero
    gq = np.asarray(_grads(q, k, v, spec, **kw)[0])
    assert np.all(gq[0, 3] == 0.0) and np.all(gq[0, 7] == 0.0)


@pytest.mark.parametrize("normalizer", list(NORMS))
def test_all_rows_masked(normalizer):
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(25, b, t, t, hq, hkv, d)
    spec = spec_of(masks.Sinks(0) & masks.Full(), NORMS[normalizer](), positions.RoPE())
    got = run(q, k, v, spec)
    assert np.all(got == 0.0)
    for g in _grads(q, k, v, spec):
        g = np.asarray(g)
        assert np.all(np.isfinite(g))
        assert np.all(g == 0.0)


@pytest.mark.parametrize("normalizer", list(NORMS))
def test_finite_gradients_regular(normalizer):
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(26, b, t, t, hq, hkv, d)
    spec = spec_of(masks.Lambda(4, 2), NORMS[normalizer](), positions.RoPE(), distance_limit=5)
    for g in _grads(q, k, v, spec):
        g = np.asarray(g)
        assert np.all(np.isfinite(g))
        assert np.any(g != 0.0)


@pytest.mark.parametrize("normalizer", list(NORMS))
@pytest.mark.parametrize("pos_kind", ["rope", "alibi"])
def test_bfloat16(normalizer, pos_kind):
    b, t, hq, hkv, d = B, T, HQ, HKV, D
    q, k, v = data(27, b, t, t, hq, hkv, d)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    pos_obj = positions.RoPE() if pos_kind == "rope" else positions.ALiBi()
    spec = spec_of(masks.Causal(), NORMS[normalizer](), pos_obj)
    got = lcattn.attend(qb, kb, vb, spec, backend=REF)
    assert got.dtype == jnp.bfloat16
    assert got.shape == (b, t, hq, d)
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(got))
    # expected: the float64 formula on the bf16-rounded inputs
    q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (qb, kb, vb))
    pos = default_pos(b, t)
    vis = np_visible(pred_causal, pos, pos)
    kw = dict(rope=np_rope(d)) if pos_kind == "rope" else dict(slopes=ALIBI_SLOPES[hq])
    want = oracle(q64, k64, v64, vis, pos, pos, norm=normalizer, **kw)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 if normalizer != "reweighted"
                               else 5e-2)


# ----------------------------------------------------------------------------------------------
# 8. bad input
# ----------------------------------------------------------------------------------------------
def test_gqa_head_mismatch_raises():
    q, k, v = data(28, 1, 4, 4, 3, 2, 8)
    with pytest.raises(ValueError) as err:
        run(q, k, v, spec_of(masks.Causal()))
    msg = str(err.value)
    assert "3" in msg and "2" in msg and "head" in msg.lower()


@pytest.mark.parametrize("make,name", [
    (lambda: masks.Local(0), "window"),
    (lambda: masks.Local(window=0), "window"),
    (lambda: masks.Local(-2), "window"),
    (lambda: masks.Sinks(-1), r"\bn\b"),
    (lambda: masks.Chunked(0), "size"),
    (lambda: masks.Chunked(size=-4), "size"),
    (lambda: masks.Lambda(0, 2), "window"),
    (lambda: masks.Lambda(4, -1), "n_global"),
])
def test_bad_mask_parameters_raise(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("mask", [masks.Causal(), masks.Full(), masks.Local(4),
                                  masks.Causal() & (masks.Local(4) | masks.Sinks(2))])
def test_distance_limit_requires_lambda(mask):
    q, k, v = data(29, 1, 6, 6, 2, 2, 8)
    with pytest.raises(ValueError, match="distance_limit"):
        spec = spec_of(mask, position=positions.RoPE(), distance_limit=5)
        run(q, k, v, spec)


@pytest.mark.parametrize("backend", ["nope", "Reference", "", "pallas_nonexistent"])
def test_unknown_backend_raises(backend):
    q, k, v = data(30, 1, 4, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="backend"):
        lcattn.attend(f32(q), f32(k), f32(v), spec_of(masks.Causal()), backend=backend)
