"""pallas_kernels.ssd_scan: the SSD chunk-scan kernel on its own (interpret mode on CPU), and
its lowering for a GPU. Its agreement with the dense oracle, the other implementations and
their gradients through lcattn.ssm.ssd_pallas is in test_ssm.py and test_mamba2.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssd_scan import ssd_chunk_scan


def test_matches_a_token_loop_with_a_restart_and_initial_state():
    """``S_t = α_t S_{t-1} + B_t u_tᵀ`` (``α_t = 0`` at a start), ``y_t = C_tᵀ S_t``, in
    float64, T = 11 with chunks of 4 (front padding), two heads sharing one group."""
    rng = np.random.default_rng(0)
    z, t, h, p, g, n = 1, 11, 2, 3, 1, 4
    u = rng.normal(size=(z, t, h, p)).astype(np.float32)
    la = -rng.uniform(0.0, 1.0, size=(z, t, h)).astype(np.float32)
    b, c = (rng.normal(size=(z, t, g, n)).astype(np.float32) for _ in range(2))
    starts = np.zeros((z, t), bool)
    starts[0, 6] = True
    h0 = rng.normal(size=(z, h, n, p)).astype(np.float32)
    y, h_last = ssd_chunk_scan(jnp.asarray(u), jnp.asarray(la), jnp.asarray(b), jnp.asarray(c),
                               starts=jnp.asarray(starts), initial_state=jnp.asarray(h0),
                               chunk_size=4)
    state = h0[0].astype(np.float64)
    want = np.zeros((t, h, p))
    for i in range(t):
        alpha = np.exp(la[0, i]) * (not starts[0, i])                # [H]
        state = alpha[:, None, None] * state + np.einsum("n,hp->hnp", b[0, i, 0], u[0, i])
        want[i] = np.einsum("n,hnp->hp", c[0, i, 0], state)
    np.testing.assert_allclose(y[0], want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h_last[0], state, atol=1e-5, rtol=1e-5)


def test_lowers_for_a_gpu_through_triton():
    """Builds the Triton IR for CUDA on this CPU-only machine (checks shapes and ops against
    the Triton lowering; compiling to PTX and running need a GPU)."""
    z, t, h, p, g, n = 1, 320, 4, 64, 1, 64
    args = (jnp.zeros((z, t, h, p)), jnp.zeros((z, t, h)), jnp.zeros((z, t, g, n)),
            jnp.zeros((z, t, g, n)))
    fn = jax.jit(lambda *a: ssd_chunk_scan(*a, chunk_size=64, interpret=False))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "ssd_chunk_scan" in text


def test_bad_inputs_raise():
    u, la, b = jnp.zeros((1, 8, 3, 2)), jnp.zeros((1, 8, 3)), jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="H % G == 0"):
        ssd_chunk_scan(u, la, b, b)
    with pytest.raises(ValueError, match="`chunk_size` must be an integer >= 1, got 0"):
        ssd_chunk_scan(u, la, b[:, :, :1], b[:, :, :1], chunk_size=0)
