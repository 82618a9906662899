"""Checks of the ``xla`` backend beyond ``test_backends.py`` (which compares it with the
reference over the shared cases): a sparse cache, padding, traced positions, fully masked rows,
a single token, a longer Λ-mask, random shapes, and LSSAR against a million keys."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import lcattn
from lcattn import masks as M
from lcattn import normalizers as N
from lcattn import positions as P
from tests.cases import NORMS
from tests.helpers import assert_close, compare_with_reference, outputs_and_grads, qkv


def compare(q, k, v, spec, blocks=(8, 8), **kw):
    compare_with_reference(q, k, v, spec, "xla", blocks, **kw)


def test_sparse_cache_positions():
    """A sink + ring-buffer cache: keys at positions {0..3} and the last 8, out of order."""
    qpos = np.array([100], np.int32)
    kpos = np.array([0, 1, 2, 3, 96, 97, 98, 99, 100, 93, 94, 95], np.int32)
    spec = lcattn.AttentionSpec(M.Lambda(8, 4), N.Reweighted(), P.RoPE(), distance_limit=8)
    compare(*qkv(5, 1, 1, 12, 2, 2, 8), spec, blocks=(1, 4), q_positions=qpos, k_positions=kpos)


def test_padding_when_blocks_do_not_divide():
    spec = lcattn.AttentionSpec(M.Causal(), N.Softplus(), P.RoPE())
    compare(*qkv(6, 1, 37, 37, 2, 1, 8), spec, blocks=(8, 16))


def test_traced_positions_under_jit():
    q, k, v = qkv(7, 2, 20, 20, 2, 2, 8)
    spec = lcattn.AttentionSpec(M.Lambda(5, 2), N.Softplus(), P.RoPE())
    pos = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32) + 3, (2, 20))
    f = jax.jit(lambda q, k, v, p: lcattn.attend(q, k, v, spec, q_positions=p, k_positions=p,
                                                 backend="xla", block_sizes=(4, 4)))
    want = lcattn.attend(q, k, v, spec, q_positions=pos, k_positions=pos, backend="reference")
    assert_close(f(q, k, v, pos), want, jnp.float32)


def test_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = qkv(8, 1, 6, 6, 2, 2, 8)
    qseg = jnp.asarray([[0, 0, 1, 1, 9, 9]], jnp.int32)  # segment 9 has no keys
    kseg = jnp.asarray([[0, 0, 1, 1, 2, 2]], jnp.int32)
    for norm in NORMS.values():
        spec = lcattn.AttentionSpec(M.Causal(), norm, P.RoPE())
        out, grads = outputs_and_grads(q, k, v, spec, "xla", block_sizes=(2, 2),
                                       q_segment_ids=qseg, kv_segment_ids=kseg)
        np.testing.assert_array_equal(np.asarray(out[:, 4:]), 0.0)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_single_token():
    for norm in NORMS.values():
        compare(*qkv(9, 1, 1, 1, 1, 1, 4), lcattn.AttentionSpec(M.Causal(), norm, P.RoPE()))


def test_lambda_at_longer_length():
    spec = lcattn.AttentionSpec(M.Lambda(64, 8), N.Softmax(), P.RoPE(), distance_limit=64)
    compare(*qkv(10, 1, 1024, 1024, 2, 1, 16), spec, blocks=(64, 64))


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 2), tq=st.integers(1, 33), extra_k=st.integers(0, 12),
       group=st.sampled_from([1, 2, 3]), hk=st.integers(1, 2), d=st.sampled_from([4, 8]),
       window=st.integers(1, 20), n_global=st.integers(0, 6), bq=st.integers(1, 12),
       bk=st.integers(1, 12), norm=st.sampled_from(list(NORMS)))
def test_random_shapes_hypothesis(b, tq, extra_k, group, hk, d, window, n_global, bq, bk, norm):
    tk = tq + extra_k
    qpos = np.arange(extra_k, tk, dtype=np.int32)  # queries are the last tq tokens
    spec = lcattn.AttentionSpec(M.Lambda(window, n_global), NORMS[norm], P.RoPE())
    q, k, v = qkv(11, b, tq, tk, hk * group, hk, d)
    want = lcattn.attend(q, k, v, spec, q_positions=qpos, backend="reference")
    got = lcattn.attend(q, k, v, spec, q_positions=qpos, backend="xla", block_sizes=(bq, bk))
    assert_close(got, want, jnp.float32)


def test_lssar_one_query_against_a_million_keys():
    """LSSAR at 2^20 keys stays finite in float32 and equals a float64 numpy computation."""
    t, d = 2**20, 4
    rng = np.random.default_rng(12)
    q, k, v = (rng.normal(size=(1, n, 1, d)) for n in (1, t, t))
    spec = lcattn.AttentionSpec(M.Full(), N.Reweighted(p=15), P.NoPE())
    got = lcattn.attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), spec, backend="xla",
                        q_positions=np.array([t - 1], np.int32), block_sizes=(1, 8192))
    qn = q[0, 0, 0] / np.linalg.norm(q[0, 0, 0])
    kn = k[0, :, 0] / np.linalg.norm(k[0, :, 0], axis=-1, keepdims=True)
    s = np.log(d) * np.log(t) * (kn @ qn)
    a = np.logaddexp(0.0, s)
    a /= a.sum()
    r = np.maximum(t * a - 1.0, 0.0)
    w = (r / r.max()) ** 15
    want = (w / w.sum()) @ v[0, :, 0]
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got)[0, 0, 0], want, rtol=2e-3, atol=2e-4)
