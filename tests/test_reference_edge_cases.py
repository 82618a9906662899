"""Reference backend edge cases (T=1, empty rows, bfloat16, LSSAR at 2^20 keys) and bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcattn
from lcattn import masks, normalizers, positions
from tests.numpy_oracle import (
    ALIBI_SLOPES,
    HKV,
    HQ,
    REF,
    B,
    D,
    T,
    data,
    default_pos,
    f32,
    np_rope,
    np_visible,
    oracle,
    pred_causal,
    pred_full,
    run,
    spec_of,
)


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


def test_lowerable_forms_equal_the_library_functions():
    """``normalizers.log1p`` / ``softplus`` / ``finite`` (written without ``log1p`` and
    ``is_finite``, which Mosaic GPU does not lower) against float64 numpy, values and
    derivatives, over the whole float32 range the normalizers use."""
    s = np.concatenate([np.linspace(-30, 30, 20001), [-1e-8, 0.0, 1e-8, 80.0, -80.0]])
    x = jnp.asarray(s, jnp.float32)
    want = np.log1p(np.exp(s.astype(np.float32).astype(np.float64)))
    np.testing.assert_allclose(normalizers.softplus(x), want, rtol=3e-7, atol=1e-38)
    slope = jax.vmap(jax.grad(normalizers.softplus))(x)
    np.testing.assert_allclose(slope, 1 / (1 + np.exp(-s.astype(np.float32).astype(np.float64))),
                               rtol=1e-6)
    y = np.concatenate([np.logspace(-30, 0, 2001), np.linspace(0.5, 1, 1001)]).astype(np.float32)
    np.testing.assert_allclose(normalizers.log1p(jnp.asarray(y)), np.log1p(y.astype(np.float64)),
                               rtol=3e-7)
    special = jnp.asarray([0.0, -jnp.inf, jnp.inf, jnp.nan, 3e38])
    assert normalizers.finite(special).tolist() == [True, False, False, False, True]
