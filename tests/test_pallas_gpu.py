"""Checks of ``pallas_kernels.gpu`` (the Mosaic GPU sm_90a forward kernel) on CPU.

* forward against a dense float32 reference written here, run in the Mosaic GPU interpreter
  (``interpret=True``: TMA copies, barriers and the warpgroups are simulated; the
  interpreter of jax 0.10 has no WGMMA with transposed or register operands, so its two
  matmuls are plain dots of the same bf16 / fp16 operands there);
* cross-lowering for CUDA (``lower(lowering_platforms=("cuda",))``): the compiled path, with
  WGMMA, register layouts and the 227 KiB shared-memory budget, lowered without a GPU;
* clear errors for what the kernel cannot do.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcattn
from lcattn import masks as M
from lcattn import normalizers as N
from lcattn import positions as P
from pallas_kernels import block_sparse, gpu

B, T, D = 1, 256, 64
SCALE = 1.0 / D ** 0.5  # a power of two: q * SCALE is exact in bf16


def _inputs(seed, hq, hk, t=T, d=D, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    mk = lambda h: jnp.asarray(rng.normal(size=(B, h, t, d)), jnp.float32).astype(dtype)  # noqa: E731
    return mk(hq), mk(hk), mk(hk)


def _dense(q, k, v, mask, q_pos, k_pos, q_seg=None, kv_seg=None):
    """float32 ``(out, lse)`` over ``[B, H, T, D]`` inputs, K/V repeated for GQA."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    vis = np.asarray(mask(q_pos[:, :, None], k_pos[:, None, :]))[:, None]
    if q_seg is not None:
        vis = vis & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    s = np.where(vis, np.einsum("bhqd,bhkd->bhqk", q, k), -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bhqd", e / np.where(l > 0, l, 1.0), v)
    lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1)),
                   -np.inf)
    return out, lse


def _iota(t=T):
    return np.broadcast_to(np.arange(t, dtype=np.int32), (B, t))


def _run(q, k, v, mask, blocks, q_pos=None, k_pos=None, **kw):
    q_pos = _iota(q.shape[2]) if q_pos is None else q_pos
    k_pos = _iota(k.shape[2]) if k_pos is None else k_pos
    return gpu.flash_attention_pass(
        q * SCALE, k, v, {}, mask=mask, normalizer=N.Softmax(), q_positions=q_pos,
        k_positions=k_pos, block_sizes=blocks, interpret=True, **kw)


def _check(got, want, atol=2e-2):
    out, lse = got
    want_out, want_lse = want
    if want_out is not None:
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), want_out, atol=atol, rtol=2e-2)
    else:
        assert out is None
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask,blocks,heads", [
    (M.Causal(), (128, 64), (4, 2)),       # GQA, two compute warpgroups, FULL + PARTIAL
    (M.Local(40), (128, 64), (2, 1)),      # EMPTY tiles skipped
    (M.Lambda(64, 16), (64, 64), (2, 2)),  # one compute warpgroup; sinks + window
], ids=["causal-gqa", "local", "lambda"])
def test_forward_matches_dense_reference(mask, blocks, heads):
    q, k, v = _inputs(0, *heads)
    pos = _iota()
    _check(_run(q, k, v, mask, blocks), _dense(q * SCALE, k, v, mask, pos, pos))


def test_empty_tiles_are_never_read():
    """Queries at the tail (positions 128..255, an iota offset) under Local(32): NaN in the kv
    block the lists skip leaves the output finite and right."""
    q, k, v = _inputs(3, 2, 1)
    q = q[:, :, 128:]
    q_pos, k_pos = _iota()[:, 128:], _iota()
    poison = jnp.arange(T)[None, None, :, None] < 64  # kv block 0 of 4: EMPTY for every row
    k_bad, v_bad = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    mask = M.Local(32)
    got = _run(q, k_bad, v_bad, mask, (128, 64), q_pos, k_pos)
    _check(got, _dense(q * SCALE, k, v, mask, q_pos, k_pos))


def test_packed_lists_are_the_nonempty_tiles():
    """The GMEM lists (count, then 2 * kv_block + full) decode to exactly the non-empty tiles,
    FULL flags on exactly the full ones: the same metadata the TPU kernels walk."""
    mask, bq, bk, t = M.Lambda(100, 16), 128, 64, 1024
    pos = _iota(t)
    vis = np.asarray(mask(pos[0][:, None], pos[0][None, :]))
    tiles = vis.reshape(t // bq, bq, t // bk, bk)
    any_, all_ = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
    classes = block_sparse.tile_classes(mask, pos, pos, bq, bk)
    packed = np.asarray(gpu.pack_lists(block_sparse.block_lists(classes)))
    assert packed.shape[1] % 4 == 0  # rows are whole 16-byte TMA units
    visited, full = np.zeros_like(any_), np.zeros_like(any_)
    for i, row in enumerate(packed):
        entries = row[1:1 + row[0]]
        visited[i, entries // 2] = True
        full[i, entries // 2] = entries % 2 == 1
        assert len(set((entries // 2).tolist())) == row[0]
    np.testing.assert_array_equal(visited, any_)
    np.testing.assert_array_equal(full, all_)


def test_forward_matches_the_reference_backend():
    """The kernel's output equals ``lcattn.attend(backend="reference")`` (layout [B, T, H, D])."""
    q, k, v = _inputs(1, 2, 1)
    spec = lcattn.AttentionSpec(M.Lambda(64, 16), N.Softmax(), P.NoPE())
    want = lcattn.attend(*(jnp.swapaxes(x.astype(jnp.float32), 1, 2) for x in (q, k, v)),
                         spec, backend="reference")
    out, _ = _run(q, k, v, spec.mask, (128, 64))
    np.testing.assert_allclose(np.asarray(out), np.asarray(jnp.swapaxes(want, 1, 2)),
                               atol=2e-2, rtol=2e-2)


def test_traced_positions_segment_ids_padding_and_lse_only_pass():
    """Positions and segment ids from GMEM rows (traced lists), a length that is no multiple of
    the blocks (padded keys masked), fp16, and a pass without values (lse only)."""
    t = 200
    q, k, v = _inputs(2, 2, 1, t=t, dtype=jnp.float16)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32) + 5, (B, t))
    seg = (np.arange(t) >= 90).astype(np.int32)[None]
    mask = M.Causal()
    want = _dense(q * SCALE, k, v, mask, pos, pos, seg, seg)
    kw = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))
    _check(_run(q, k, v, mask, (128, 64), jnp.asarray(pos), jnp.asarray(pos), **kw), want)
    _check(_run(q, k, None, mask, (128, 64), jnp.asarray(pos), jnp.asarray(pos), **kw),
           (None, want[1]))


class _Tempered(N.Softmax):
    """A test normalizer reading the row context: ``t = s * temp - shift``."""

    def log_weight(self, s, ctx, pass_idx=0):
        return s * ctx["temp"] - ctx["shift"]


def test_log_weight_reads_the_row_context():
    """``ctx`` rows reach ``normalizer.log_weight``: lse shifts by ``shift``, scores scale."""
    t = 128
    q, k, v = _inputs(4, 1, 1, t=t)
    rng = np.random.default_rng(5)
    temp = jnp.asarray(rng.uniform(0.5, 2.0, size=(B, 1, t)), jnp.float32)
    shift = jnp.asarray(rng.normal(size=(B, 1, t)), jnp.float32)
    pos = _iota(t)
    got = gpu.flash_attention_pass(
        q * SCALE, k, v, {"temp": temp, "shift": shift}, mask=M.Causal(), normalizer=_Tempered(),
        q_positions=pos, k_positions=pos, block_sizes=(64, 64), interpret=True)
    out, lse = _dense(q.astype(jnp.float32) * SCALE * temp[..., None], k, v, M.Causal(), pos, pos)
    _check(got, (out, lse - np.asarray(shift)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_cuda(d, dtype):
    """The compiled kernel (WGMMA, layouts, SMEM budget) lowers for sm_90a without a GPU:
    iota positions, GMEM positions + segment ids, an lse-only pass, softcap, ping-pong."""
    t, hq, hk = 1024, 4, 2
    pos = _iota(t)
    q, k = (jax.ShapeDtypeStruct((B, h, t, d), dtype) for h in (hq, hk))
    ids = jax.ShapeDtypeStruct((B, t), jnp.int32)

    def fwd(q, k, v, p, seg, *, values=True, traced=False, norm=N.Softmax(), pingpong=False):
        where = dict(q_positions=p, k_positions=p, q_segment_ids=seg, kv_segment_ids=seg) \
            if traced else dict(q_positions=pos, k_positions=pos)
        return gpu.flash_attention_pass(q, k, v if values else None, {}, mask=M.Lambda(256, 64),
                                        normalizer=norm, block_sizes=(128, 128),
                                        pingpong=pingpong, **where)

    for kw in ({}, {"traced": True}, {"values": False}, {"norm": N.Softmax(softcap=20.0)},
               {"norm": N.VisibleCount()}, {"pingpong": True}, {"pingpong": True, "values": False}):
        lowered = jax.jit(lambda *a: fwd(*a, **kw)).trace(q, k, k, ids, ids).lower(
            lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()


def test_pingpong_schedule_runs_and_changes_nothing():
    """The ping-pong barrier between the two compute warpgroups in the interpreter (which
    simulates barrier arrivals and waits): the same output and lse bit for bit as without it,
    Λ-mask, GQA, two kv blocks per tile. A protocol whose warpgroups pass the barrier
    unequally often deadlocks the interpreter, so the call runs in a thread with a deadline."""
    import threading

    q, k, v = _inputs(10, 2, 1, t=128)
    got = {}

    def run():
        got["pp"] = _run(q, k, v, M.Lambda(32, 8), (128, 64), pingpong=True)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=240)
    assert "pp" in got, "the ping-pong kernel did not finish (deadlock?)"
    plain = _run(q, k, v, M.Lambda(32, 8), (128, 64), pingpong=False)
    for a, b in zip(got["pp"], plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="pingpong=True needs two compute warpgroups"):
        _run(q, k, v, M.Causal(), (64, 64), pingpong=True)


def test_shared_memory_overflow_is_caught(monkeypatch):
    """Tiles past sm_90a's 227 KiB: a clear error from the entry point's estimate, and
    Mosaic GPU's own when the estimate is switched off and the kernel is lowered."""
    q = jax.ShapeDtypeStruct((B, 2, 1024, 256), jnp.bfloat16)

    def fwd(q, k, v):
        return gpu.flash_attention_pass(q, k, v, {}, mask=M.Causal(), normalizer=N.Softmax(),
                                        q_positions=_iota(1024), k_positions=_iota(1024),
                                        block_sizes=(128, 128))

    with pytest.raises(ValueError, match="need about .* bytes of shared memory"):
        fwd(q, q, q)
    monkeypatch.setattr(gpu.flash_attention, "SMEM_BYTES", 1 << 30)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        jax.jit(fwd).trace(q, q, q).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("change,message", [
    (dict(d=80), "head_dim of `q` must be one of"),
    (dict(dtype=jnp.float32), "must all be bfloat16 or float16"),
    (dict(blocks=(96, 64)), "block_q must be 64, 128 or 256"),
    (dict(blocks=(128, 96)), "block_k must be a multiple of 64"),
], ids=["head_dim", "dtype", "block_q", "block_k"])
def test_unsupported_inputs_raise(change, message):
    d, dtype = change.get("d", D), change.get("dtype", jnp.bfloat16)
    q = jnp.zeros((B, 2, 128, d), dtype)
    with pytest.raises(ValueError, match=message):
        gpu.flash_attention_pass(q, q, q, {}, mask=M.Causal(), normalizer=N.Softmax(),
                                 q_positions=_iota(128), k_positions=_iota(128),
                                 block_sizes=change.get("blocks", (128, 64)))


def test_lssa_softplus_pass_in_the_interpreter():
    """LSSA's log-weight ``log softplus(s)`` (written without ``log1p``) in the kernel: out is
    ``sum softplus(s) v / sum softplus(s)`` and lse ``log sum softplus(s)``, computed here in
    float64 numpy."""
    q, k, v = _inputs(6, 2, 1)
    q, k = ((x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True) * c)
            .astype(jnp.bfloat16) for x, c in ((q, 4.0), (k, 1.0)))
    mask, pos = M.Causal(), _iota()
    out, lse = gpu.flash_attention_pass(q, k, v, {}, mask=mask, normalizer=N.Softplus(),
                                        q_positions=pos, k_positions=pos, block_sizes=(64, 64),
                                        interpret=True)
    qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))
    kf, vf = np.repeat(kf, 2, axis=1), np.repeat(vf, 2, axis=1)
    vis = np.asarray(mask(pos[:, :, None], pos[:, None, :]))[:, None]
    w = np.where(vis, np.log1p(np.exp(np.einsum("bhqd,bhkd->bhqk", qf, kf))), 0.0)
    np.testing.assert_allclose(np.asarray(lse), np.log(w.sum(-1)), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out), np.einsum("bhqk,bhkd->bhqd", w, vf)
                               / w.sum(-1, keepdims=True), atol=2e-2, rtol=2e-2)


def test_lssa_and_lssar_lower_for_cuda(monkeypatch):
    """Softplus and both passes of Reweighted lower for sm_90a (no log1p / is_finite left);
    Reweighted with split operands (float32 q, k): at head_dim 128 the default tiles shrink to
    128 x 64 to fit SMEM, 128 x 128 is refused by the estimate and by Mosaic GPU itself."""
    t, d = 512, 128
    pos = _iota(t)
    row = jax.ShapeDtypeStruct((B, 4, t), jnp.float32)

    def lower(norm, pass_idx, values, split, blocks=None):
        dtype = jnp.float32 if split else jnp.bfloat16
        q, k = (jax.ShapeDtypeStruct((B, h, t, d), dtype) for h in (4, 2))
        v = jax.ShapeDtypeStruct((B, 2, t, d), jnp.bfloat16)

        def fwd(q, k, v, count, lse, q_pos):
            ctx = {"count": count, "lse": lse, "q_pos": q_pos} if pass_idx else {}
            return gpu.flash_attention_pass(q, k, v if values else None, ctx, mask=M.Causal(),
                                            normalizer=norm, pass_idx=pass_idx,
                                            q_positions=pos, k_positions=pos,
                                            block_sizes=blocks, split_qk=split)
        return jax.jit(fwd).trace(q, k, v, row, row, row).lower(lowering_platforms=("cuda",))

    for norm, pass_idx, values, split in ((N.Softplus(), 0, True, False),
                                          (N.Reweighted(), 0, False, True),
                                          (N.Reweighted(), 1, True, True)):
        assert "mosaic_gpu" in lower(norm, pass_idx, values, split).as_text()
    with pytest.raises(ValueError, match="need about .* bytes of shared memory"):
        lower(N.Reweighted(), 1, True, True, (128, 128))
    monkeypatch.setattr(gpu.flash_attention, "SMEM_BYTES", 1 << 30)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        lower(N.Reweighted(), 1, True, True, (128, 128))


def test_split_operands():
    """``split``: bf16 halves whose sum is the float32 input to 16 mantissa bits (bf16 alone:
    8), and the dtype rules of ``split_qk``."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4096,)) * 30.0, jnp.float32)
    hi, lo = gpu.flash_attention.split(x, True)
    assert hi.dtype == lo.dtype == jnp.bfloat16
    rel = lambda y: float(jnp.max(jnp.abs(y - x) / jnp.abs(x)))  # noqa: E731
    assert rel(hi.astype(jnp.float32) + lo.astype(jnp.float32)) < 2.0 ** -16 < rel(hi)
    q = jnp.zeros((B, 2, 128, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="split_qk=True takes float32 q, k"):
        gpu.flash_attention_pass(q, q, q, {}, mask=M.Causal(), normalizer=N.Softmax(),
                                 q_positions=_iota(128), k_positions=_iota(128), split_qk=True)


@pytest.mark.parametrize("spec,segments", [
    (lcattn.AttentionSpec(M.Lambda(32, 8), distance_limit=32), False),
    (lcattn.AttentionSpec(M.Full(), N.Reweighted()), True),
    (lcattn.AttentionSpec(M.Chunked(48), N.Softplus()), False),
], ids=["softmax-lambda-limit", "full-segments-lssar", "chunked-lssa"])
def test_backend_equals_the_reference(spec, segments, monkeypatch):
    """``attend(backend="pallas_gpu")`` (interpreter off GPU) over float32 inputs: the kernels'
    bf16 operands keep the output within 5e-2 of the float32 reference (LM-Infinite's two
    branches, LSSA's count, LSSAR's two passes, segment ids all go through them). Gradients
    through the dQ and dK/dV kernels (LSSAR's pass 1 differentiates through the row context
    ``lse`` of pass 0) within 3 % of the largest reference gradient; LSSAR at p = 15 only with
    its split ``QKᵀ`` operands (bf16 scores fail the gradient check). Two query heads on one
    kv head (GQA at its cheapest: the interpreter's time grows with the heads). Causal
    softmax through the backend: ``test_forward_matches_the_reference_backend`` and the
    kernels' gradient tests; LSSA through the kernels: Chunked here, Causal and Λ in the
    kernels' own tests (the backend-side wiring of every spec is shared with ``pallas_triton``,
    whose matrix is cheaper to run); LSSAR's precision over every normalizer:
    ``experiments/benchmarks/gpu_precision.py``."""
    from lcattn.backends import pallas_gpu

    q, k, v = (jnp.swapaxes(x.astype(jnp.float32), 1, 2) for x in _inputs(7, 2, 1, t=128))
    seg = jnp.asarray(np.repeat([0, 1, 2], [50, 40, 38])[None], jnp.int32)
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
    out = lcattn.attend(q, k, v, spec, backend="pallas_gpu", block_sizes=(64, 64), **kw)
    ref = lcattn.attend(q, k, v, spec, backend="reference", **kw)
    np.testing.assert_allclose(out, ref, atol=5e-2)
    assert float(jnp.mean(jnp.abs(out - ref))) < 1e-2
    calls, kernel_bwd = [], pallas_gpu.flash_attention_bwd
    monkeypatch.setattr(pallas_gpu, "flash_attention_bwd",
                        lambda *a, **kw: calls.append(1) or kernel_bwd(*a, **kw))
    cot = jnp.asarray(np.random.default_rng(8).normal(size=q.shape), jnp.float32)
    grads, ref_grads = (jax.grad(lambda q, k, v, b=b: jnp.sum(lcattn.attend(
        q, k, v, spec, backend=b, block_sizes=(64, 64), **kw) * cot), argnums=(0, 1, 2))(q, k, v)
        for b in ("pallas_gpu", "reference"))
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=0.03 * float(jnp.max(jnp.abs(r))))
    branches = 1 if spec.distance_limit is None else 2  # LM-Infinite: window and sinks
    assert len(calls) == spec.normalizer.num_passes * branches  # the kernels ran


def test_alibi_in_the_kernels_forward_and_gradients():
    """ALiBi's bias ``-m_h |i - j|`` added to ``QKᵀ`` inside the forward, dQ and dK/dV
    kernels (per query head's slope; the dK/dV walk over a GQA group's heads), Λ-mask with
    FULL and PARTIAL tiles: output and gradients against the reference backend."""
    spec = lcattn.AttentionSpec(M.Lambda(48, 8), position=P.ALiBi())
    q, k, v = (jnp.swapaxes(x.astype(jnp.float32), 1, 2) for x in _inputs(9, 2, 1, t=128))
    cot = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)
    out, ref = (lcattn.attend(q, k, v, spec, backend=b, block_sizes=(64, 64))
                for b in ("pallas_gpu", "reference"))
    np.testing.assert_allclose(out, ref, atol=5e-2)
    assert float(jnp.mean(jnp.abs(out - ref))) < 1e-2
    grads, ref_grads = (jax.grad(lambda q, k, v, b=b: jnp.sum(lcattn.attend(
        q, k, v, spec, backend=b, block_sizes=(64, 64)) * cot), argnums=(0, 1, 2))(q, k, v)
        for b in ("pallas_gpu", "reference"))
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=0.03 * float(jnp.max(jnp.abs(r))))
    no_bias = jax.grad(lambda q: jnp.sum(lcattn.attend(
        q, k, v, lcattn.AttentionSpec(M.Lambda(48, 8), position=P.NoPE()), backend="reference")
        * cot))(q)
    assert float(jnp.max(jnp.abs(no_bias - ref_grads[0]))) > 0.1 * float(
        jnp.max(jnp.abs(ref_grads[0])))   # the bias matters at this size


def test_alibi_lowers_for_cuda():
    """The forward, dQ and dK/dV kernels with ALiBi's bias rows and slopes lower for sm_90a
    (D = 128, bf16, Λ-mask, GQA)."""
    from pallas_kernels.gpu.backward import flash_attention_bwd
    from pallas_kernels.protocols import Bias

    t, d = 512, 128
    pos = _iota(t)
    q, k = (jax.ShapeDtypeStruct((B, h, t, d), jnp.bfloat16) for h in (4, 2))
    row, ids = jax.ShapeDtypeStruct((B, 4, t), jnp.float32), jax.ShapeDtypeStruct((B, t), jnp.int32)
    kw = dict(mask=M.Lambda(128, 16), normalizer=N.Softmax(), q_positions=pos, k_positions=pos)
    bias = lambda b: Bias(P.alibi_bias, b, b, P.alibi_slopes(4))  # noqa: E731
    fwd = jax.jit(lambda q, k, v, b: gpu.flash_attention_pass(q, k, v, {}, bias=bias(b), **kw))
    assert "mosaic_gpu" in fwd.trace(q, k, k, ids).lower(lowering_platforms=("cuda",)).as_text()
    bwd = jax.jit(lambda q, k, v, o, lse, do, b: flash_attention_bwd(
        q, k, v, {}, o, lse, do, None, bias=bias(b), **kw))
    text = bwd.trace(q, k, k, q, row, q, ids).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2


def test_causal_softmax_equals_jax_pallas_gpu_mha():
    """An outside cross-check: jax's own Pallas GPU ``mha`` (Triton-style kernel, interpret
    mode) on the same bf16 inputs, causal softmax, no GQA."""
    from jax.experimental.pallas.ops.gpu import attention as jax_attention

    q, k, v = _inputs(10, 2, 2, t=128)
    theirs = jax_attention.mha(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), None,
                               sm_scale=SCALE, causal=True, interpret=True)
    ours, _ = _run(q, k, v, M.Causal(), (64, 64))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(jnp.swapaxes(theirs, 1, 2),
                                                            np.float32), atol=2e-2, rtol=2e-2)
