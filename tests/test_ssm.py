"""lcattn.ssm: SSD against independent float64 numpy formulas; chunked vs sequential; options."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcattn import ssm

Z, T, H, P, G, N = 2, 37, 4, 3, 2, 5
SEG = np.array([[1] * 10 + [2] * 20 + [3] * 7, [1] * 30 + [0] * 7])   # two documents + padding


def inputs(t=T, seed=0, dt_range=(0.05, 1.0)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(Z, t, H, P)).astype(np.float32),
            rng.uniform(*dt_range, size=(Z, t, H)).astype(np.float32),
            -rng.uniform(0.2, 2.0, size=(H,)).astype(np.float32),
            rng.normal(size=(Z, t, G, N)).astype(np.float32),
            rng.normal(size=(Z, t, G, N)).astype(np.float32))


def dense_oracle(x, dt, A, B, C, seg=None, *, decay_scale=1.0, input_scale=1.0,
                 input_clip=None, window=None, h0=None):
    """In float64: ``y_i = Σ_j [j <= i, same document, i - j < window] C_iᵀB_j
    exp(Σ_{j<k<=i} λΔ_kA) κ_j x_j`` (+ ``C_iᵀ exp(Σ_{k<=i} λΔ_kA) h0`` before the first
    document change)."""
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    z, t, h, _ = x.shape
    bh, ch = np.repeat(B, h // B.shape[2], axis=2), np.repeat(C, h // B.shape[2], axis=2)
    log_a = decay_scale * dt * A
    kappa = input_scale * dt
    if input_clip is not None:
        size = kappa * np.linalg.norm(bh, axis=-1) * np.linalg.norm(x, axis=-1)
        kappa = kappa * np.minimum(1.0, input_clip / size)
    seg = np.ones((z, t), int) if seg is None else np.asarray(seg)
    i, j = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    y = np.zeros_like(x)
    for b in range(z):
        total = np.cumsum(log_a[b], axis=0)                     # Σ_{k<=i} log α_k, [T, H]
        same_doc = np.array([[len(set(seg[b, jj:ii + 1])) == 1 for jj in range(t)]
                             for ii in range(t)])
        visible = (j <= i) & same_doc
        if window is not None:
            visible &= i - j < window
        gap = np.where(visible[..., None], total[:, None] - total[None], -np.inf)
        w = np.exp(gap) * np.einsum("ihn,jhn->ijh", ch[b], bh[b]) * kappa[b][None]
        y[b] = np.einsum("ijh,jhp->ihp", w, x[b])
        if h0 is not None:
            first_doc = np.cumsum(np.r_[0, seg[b, 1:] != seg[b, :-1]]) == 0
            y[b] += (first_doc[:, None, None] * np.exp(total)[..., None]
                     * np.einsum("ihn,hnp->ihp", ch[b], np.asarray(h0[b], np.float64)))
    return y


def starts():
    return ssm.segment_starts(jnp.asarray(SEG))


IMPLS = {"sequential": ssm.ssd_sequential,
         "chunked8": functools.partial(ssm.ssd_chunked, chunk_size=8),
         "chunked5": functools.partial(ssm.ssd_chunked, chunk_size=5),
         # a scan over 4 blocks of 3 chunks (the first block front-padded) unless windowed
         "blocked": functools.partial(ssm.ssd_chunked, chunk_size=4, block_size=12),
         # pallas_kernels.ssd_scan in interpret mode (no window / state_clip)
         "pallas": functools.partial(ssm.ssd_pallas, chunk_size=8)}


@functools.partial(jax.jit, static_argnames=("impl", "options"))
def run(impl, x, dt, A, B, C, starts=None, state=None, options=ssm.SSMOptions()):
    return IMPLS[impl](x, dt, A, B, C, options=options, starts=starts, state=state)


OPTION_CASES = {
    "plain": {},
    "decay_input_scale": {"decay_scale": 1.7, "input_scale": 0.3},
    "input_clip": {"input_clip": 0.4},
    "window8": {"window": 8},
    "window16_scaled": {"window": 16, "decay_scale": 0.5},
}


@pytest.mark.parametrize("impl, case", [
    (impl, case) for impl in IMPLS for case in OPTION_CASES
    if not (impl in ("chunked5", "pallas") and "window" in OPTION_CASES[case])])
def test_matches_dense_oracle_with_packed_documents(impl, case):
    kw = OPTION_CASES[case]
    x, dt, A, B, C = inputs()
    y, _ = run(impl, x, dt, A, B, C, options=ssm.SSMOptions(**kw), starts=starts())
    np.testing.assert_allclose(y, dense_oracle(x, dt, A, B, C, SEG, **kw), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["sequential", "chunked8", "blocked", "pallas"])
def test_initial_state_is_read_out_until_the_first_document_change(impl):
    x, dt, A, B, C = inputs(seed=1)
    h0 = np.random.default_rng(2).normal(size=(Z, H, N, P)).astype(np.float32)
    state = ssm.SSMState(jnp.asarray(h0), *(jnp.zeros((Z, 0) + s) for s in ((G, N), (H, P),
                                                                             (H,))))
    y, _ = run(impl, x, dt, A, B, C, starts=starts(), state=state)
    np.testing.assert_allclose(y, dense_oracle(x, dt, A, B, C, SEG, h0=h0), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 8])
def test_split_runs_and_decode_steps_continue_the_state(window):
    """Prefix then suffix (any implementation for either part) == one run; same final state."""
    opts = ssm.SSMOptions(window=window)
    x, dt, A, B, C = (jnp.asarray(a) for a in inputs(seed=3))
    s = starts()
    y_full, s_full = run("sequential", x, dt, A, B, C, options=opts, starts=s)
    _, s_chunked = run("chunked8", x, dt, A, B, C, options=opts, starts=s)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), s_chunked, s_full)
    for cut, first, second in ((12, "chunked8", "chunked8"), (29, "sequential", "chunked8"),
                               (5, "chunked8", "sequential")):
        head = [a[:, :cut] for a in (x, dt)] + [A] + [a[:, :cut] for a in (B, C)]
        tail = [a[:, cut:] for a in (x, dt)] + [A] + [a[:, cut:] for a in (B, C)]
        y1, st = run(first, *head, options=opts, starts=s[:, :cut])
        y2, st = run(second, *tail, options=opts, starts=s[:, cut:], state=st)
        np.testing.assert_allclose(np.concatenate([y1, y2], 1), y_full, atol=2e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), st, s_full)
    st = ssm.init_state(Z, num_heads=H, head_dim=P, state_dim=N, num_groups=G, options=opts)
    step = jax.jit(lambda st, i: ssm.ssd_step(st, x[:, i], dt[:, i], A, B[:, i], C[:, i],
                                              options=opts, start=s[:, i]))
    ys = []
    for i in range(T):
        y, st = step(st, i)
        ys.append(y)
    np.testing.assert_allclose(np.stack(ys, 1), y_full, atol=2e-5)


def test_state_clip_matches_a_loop_and_bounds_the_state():
    clip = 1.5
    x, dt, A, B, C = inputs(t=20, seed=4, dt_range=(0.5, 2.0))
    A = np.full_like(A, -0.01)   # almost no decay: the state grows until clipped
    y, state = run("sequential", x, dt, A, B, C, options=ssm.SSMOptions(state_clip=clip))
    bh, ch = np.repeat(B, H // G, axis=2), np.repeat(C, H // G, axis=2)
    h, want = np.zeros((Z, H, N, P)), np.zeros(x.shape)
    for t in range(x.shape[1]):
        h = np.exp(dt[:, t] * A)[..., None, None] * h \
            + dt[:, t, :, None, None] * bh[:, t, :, :, None] * x[:, t, :, None, :]
        norm = np.sqrt((h ** 2).sum((-2, -1), keepdims=True))
        h = h * np.minimum(1.0, clip / norm)
        want[:, t] = np.einsum("zhn,zhnp->zhp", ch[:, t], h)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)
    norms = np.sqrt((np.asarray(state.h) ** 2).sum((-2, -1)))
    assert norms.max() <= clip * (1 + 1e-5) and norms.max() > 0.99 * clip
    with pytest.raises(ValueError, match="state_clip.*sequential"):
        ssm.ssd_chunked(x, dt, A, B, C, options=ssm.SSMOptions(state_clip=clip))
    y_auto, _ = ssm.ssd(x, dt, A, B, C, options=ssm.SSMOptions(state_clip=clip))
    np.testing.assert_allclose(y_auto, y)


@pytest.mark.parametrize("impl, kw, t", [
    ("chunked8", {"window": 8, "input_clip": 0.5}, 21),
    ("chunked8", {"decay_scale": 1.3}, 37),
    ("blocked", {}, 37),
    ("pallas", {"input_clip": 0.5}, 21),
])
def test_gradients_chunked_match_sequential(impl, kw, t):
    """Gradients w.r.t. x, dt, A, B, C and the incoming state, through documents; the
    chunked form's come from the stages' hand-written backward passes."""
    x, dt, A, B, C = inputs(t=t, seed=5)
    s = starts()[:, :t]
    opts = ssm.SSMOptions(**kw)
    h0 = np.random.default_rng(8).normal(size=(Z, H, N, P)).astype(np.float32)

    def loss(impl):
        def f(*args):
            state = ssm.init_state(Z, num_heads=H, head_dim=P, state_dim=N, num_groups=G,
                                   options=opts)
            if not opts.window:   # a windowed state is its ring; h is derived from it
                state = dataclasses.replace(state, h=args[-1])
            y, st = impl(*args[:-1], options=opts, starts=s, state=state)
            return jnp.sum(jnp.sin(y)) + jnp.sum(st.h ** 2)
        return jax.jit(jax.grad(f, argnums=tuple(range(6))))

    want = loss(IMPLS["sequential"])(x, dt, A, B, C, h0)
    got = loss(IMPLS[impl])(x, dt, A, B, C, h0)
    for g, w in zip(got, want):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["chunked8", "blocked", "pallas"])
def test_bfloat16_inputs_match_sequential(impl):
    """bf16 in, float32 math inside, bf16 out: values and gradients within bf16 rounding of
    the sequential scan on the same bf16 inputs."""
    args = tuple(jnp.asarray(a, jnp.bfloat16) for a in inputs(seed=9))
    s = starts()

    def value_and_grad(impl):
        def f(*a):
            return jnp.sum(IMPLS[impl](*a, starts=s)[0].astype(jnp.float32) ** 2)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3, 4)))(*args)

    (want, want_g), (got, got_g) = value_and_grad("sequential"), value_and_grad(impl)
    y_want = IMPLS["sequential"](*args, starts=s)[0]
    y_got = IMPLS[impl](*args, starts=s)[0]
    assert y_got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y_got, np.float32), np.asarray(y_want, np.float32),
                               atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(got, want, rtol=1e-2)
    for g, w in zip(got_g, want_g):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=5e-2, rtol=5e-2)


def test_strong_decay_long_sequence_stays_finite():
    """``exp`` only ever sees non-positive exponents: very fast decay underflows to 0, no NaN."""
    x, dt, A, B, C = inputs(t=300, seed=6, dt_range=(1.0, 50.0))
    A = np.full_like(A, -30.0)
    f = jax.jit(lambda *a: ssm.ssd_chunked(*a, chunk_size=64)[0])
    y = f(x, dt, A, B, C)
    g = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(1, 2))(x, dt, A, B, C)
    assert all(np.isfinite(np.asarray(a)).all() for a in (y,) + g)
    # decay ~ exp(-1500) per step: each output reads (almost) only its own token
    own = np.einsum("zthn,zthn->zth", np.repeat(C, H // G, 2), np.repeat(B, H // G, 2))
    np.testing.assert_allclose(y, own[..., None] * dt[..., None] * x, rtol=1e-4, atol=1e-4)


def test_causal_conv_resets_at_document_starts_and_continues_history():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(Z, T, 6)).astype(np.float32)
    w, b = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(6,)).astype(np.float32)
    y, hist = ssm.causal_conv(jnp.asarray(x), w, b, starts=starts())
    want = np.tile(b, (Z, T, 1)).astype(np.float64)
    for z in range(Z):
        for t in range(T):
            for k in range(4):
                if t - k >= 0 and SEG[z, t - k] == SEG[z, t]:
                    want[z, t] += w[k] * x[z, t - k]
    np.testing.assert_allclose(y, want, atol=1e-5)
    # history: the last 3 inputs, zeroed before the last document start (row 0 starts at 30)
    np.testing.assert_allclose(hist[1], x[1, -3:])
    np.testing.assert_allclose(hist[0], x[0, -3:])
    y1, h1 = ssm.causal_conv(jnp.asarray(x[:, :20]), w, b)
    y2, _ = ssm.causal_conv(jnp.asarray(x[:, 20:]), w, b, history=h1)
    y_all, _ = ssm.causal_conv(jnp.asarray(x), w, b)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), y_all, atol=1e-6)


def test_segment_starts():
    got = np.asarray(ssm.segment_starts(jnp.asarray([[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3]])))
    np.testing.assert_array_equal(got, [[0, 0, 1, 0, 0, 1], [0] * 6])
    assert ssm.segment_starts(None) is None


@pytest.mark.parametrize("kw, match", [
    ({"decay_scale": 0.0}, "decay_scale.*> 0"),
    ({"input_scale": float("inf")}, "input_scale.*finite"),
    ({"input_clip": -1.0}, "input_clip.*None or a finite number > 0"),
    ({"state_clip": "big"}, "state_clip"),
    ({"window": 0}, "window.*None or an integer >= 1"),
    ({"window": 2.5}, "window"),
    ({"window": 8, "state_clip": 1.0}, "window.*state_clip.*cannot be combined"),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ssm.SSMOptions(**kw)


def test_bad_calls_raise():
    x, dt, A, B, C = inputs(t=8)
    with pytest.raises(ValueError, match="impl.*'auto', 'chunked', 'sequential', 'pallas'"):
        ssm.ssd(x, dt, A, B, C, impl="triton")
    with pytest.raises(ValueError, match=r"window.*\(12\).*multiple of `chunk_size` \(8\)"):
        ssm.ssd_chunked(x, dt, A, B, C, options=ssm.SSMOptions(window=12), chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size"):
        ssm.ssd_chunked(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="`block_size` must be an integer >= 1, got 0"):
        ssm.ssd_chunked(x, dt, A, B, C, block_size=0)
    with pytest.raises(ValueError, match="ssd_pallas: `chunk_size` must be an integer >= 1"):
        ssm.ssd_pallas(x, dt, A, B, C, chunk_size=True)
    with pytest.raises(ValueError, match="options.window.*not supported by the Pallas"):
        ssm.ssd(x, dt, A, B, C, options=ssm.SSMOptions(window=8), impl="pallas")
    with pytest.raises(ValueError, match=r"heads \(4\).*groups \(3\)"):
        ssm.ssd_sequential(x, dt, A, B[..., :1, :].repeat(3, 2), C[..., :1, :].repeat(3, 2))
    with pytest.raises(ValueError, match="`dt` must be"):
        ssm.ssd_sequential(x, dt[:, :4], A, B, C)
    with pytest.raises(ValueError, match="state.*window=8"):
        ssm.ssd_sequential(x, dt, A, B, C, options=ssm.SSMOptions(window=8),
                           state=ssm.init_state(Z, num_heads=H, head_dim=P, state_dim=N,
                                                num_groups=G))
