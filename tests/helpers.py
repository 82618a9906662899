"""Shared test utilities: random attention inputs and backend comparison."""
import jax
import jax.numpy as jnp
import numpy as np

import lcattn

TOL = {np.dtype(jnp.float32): dict(atol=2e-5, rtol=2e-4),
       np.dtype(jnp.bfloat16): dict(atol=3e-2, rtol=3e-2)}


def qkv(seed, b, tq, tk, hq, hk, d, dtype=jnp.float32, dv=None):
    rng = np.random.default_rng(seed)

    def mk(t, h, w):
        return jnp.asarray(rng.normal(size=(b, t, h, w)), jnp.float32).astype(dtype)

    return mk(tq, hq, d), mk(tk, hk, d), mk(tk, hk, dv or d)


def outputs_and_grads(q, k, v, spec, backend, **kw):
    """Forward output and grads of ``<out, cot>`` w.r.t. q, k, v (cot fixed by shape)."""
    cot = jnp.asarray(np.random.default_rng(7).normal(size=q.shape[:3] + v.shape[3:]),
                      jnp.float32)

    def loss(q_, k_, v_):
        out = lcattn.attend(q_, k_, v_, spec, backend=backend, **kw)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_close(got, want, dtype, scale_by_max=False):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all() and np.isfinite(want).all()
    tol = TOL[np.dtype(dtype)]
    if scale_by_max:  # gradients: compare relative to the largest entry
        tol = dict(atol=tol["atol"] + tol["rtol"] * float(np.abs(want).max()), rtol=tol["rtol"])
    np.testing.assert_allclose(got, want, **tol)


def compare_with_reference(q, k, v, spec, backend, blocks, **kw):
    """``backend`` against the reference oracle: output and q/k/v gradients, dtype-aware."""
    ref_out, ref_grads = outputs_and_grads(q, k, v, spec, "reference", **kw)
    out, grads = outputs_and_grads(q, k, v, spec, backend, block_sizes=blocks, **kw)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, q.dtype)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype, name
        assert_close(g, rg, q.dtype, scale_by_max=True)


def packed_documents(b, t, n_docs, seed):
    """Segment ids of ``n_docs`` random-length documents and per-document positions."""
    rng = np.random.default_rng(seed)
    seg = np.sort(rng.integers(0, n_docs, size=(b, t)), axis=1).astype(np.int32)
    starts = np.array([[np.argmax(row == s) for s in row] for row in seg])
    return seg, (np.arange(t)[None] - starts).astype(np.int32)
