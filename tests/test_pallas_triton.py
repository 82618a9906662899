"""Checks of ``pallas_kernels.gpu.triton_forward`` / ``triton_backward`` (the Pallas Triton
kernels for GPUs without WGMMA) and of ``lcattn``'s ``pallas_triton`` backend, on CPU:

* forward against the dense float32 reference of ``test_pallas_gpu``, gradients against the
  dense VJPs of ``test_pallas_gpu_bwd``, in Pallas interpret mode (the same kernel bodies,
  their loads and dots evaluated by XLA on CPU);
* cross-lowering for CUDA through Triton (the Triton IR the GPU would compile);
* clear errors, and ``pallas_gpu`` handing its passes to it on a GPU that is not sm_90.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcattn
from lcattn import masks as M
from lcattn import normalizers as N
from lcattn import positions as P
from pallas_kernels.gpu import triton_backward, triton_forward
from pallas_kernels.protocols import Bias
from tests import test_pallas_gpu_bwd as bwd_checks
from tests.test_pallas_gpu import SCALE, B, _check, _dense, _inputs, _iota, _Tempered


def _run(q, k, v, mask, blocks, q_pos=None, k_pos=None, ctx=None, normalizer=None, **kw):
    q_pos = _iota(q.shape[2]) if q_pos is None else q_pos
    k_pos = _iota(k.shape[2]) if k_pos is None else k_pos
    return triton_forward.flash_attention_pass(
        q * SCALE, k, v, ctx or {}, mask=mask, normalizer=normalizer or N.Softmax(),
        q_positions=q_pos, k_positions=k_pos, block_sizes=blocks, interpret=True, **kw)


@pytest.mark.parametrize("mask,blocks,heads", [
    (M.Causal(), (64, 32), (4, 2)),        # GQA, FULL + PARTIAL tiles
    (M.Local(40), (32, 32), (2, 1)),       # EMPTY tiles skipped
    (M.Lambda(64, 16), (64, 64), (2, 2)),  # sinks + window
], ids=["causal-gqa", "local", "lambda"])
def test_forward_matches_dense_reference(mask, blocks, heads):
    q, k, v = _inputs(0, *heads)
    pos = _iota()
    _check(_run(q, k, v, mask, blocks), _dense(q * SCALE, k, v, mask, pos, pos))


def test_traced_positions_segment_ids_padding_float32_and_lse_only_pass():
    """Positions and segment ids as traced GMEM rows, a length no multiple of the blocks
    (padded keys masked), float32 operands (IEEE ``QKᵀ``: tight tolerance), and a pass
    without values."""
    t = 200
    q, k, v = _inputs(2, 2, 1, t=t, dtype=jnp.float32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32) + 5, (B, t))
    seg = (np.arange(t) >= 90).astype(np.int32)[None]
    want = _dense(q * SCALE, k, v, M.Causal(), pos, pos, seg, seg)
    kw = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))
    _check(_run(q, k, v, M.Causal(), (64, 32), jnp.asarray(pos), jnp.asarray(pos), **kw), want,
           atol=1e-5)
    _check(_run(q, k, None, M.Causal(), (64, 32), jnp.asarray(pos), jnp.asarray(pos), **kw),
           (None, want[1]))


def test_log_weight_reads_the_row_context_and_bias():
    """``ctx`` rows reach ``normalizer.log_weight`` (lse shifts by ``shift``, scores scale)
    and a ``Bias`` (ALiBi's ``-m_h |i - j|``, per query head) is added to ``QKᵀ``."""
    t = 128
    q, k, v = _inputs(4, 2, 1, t=t, dtype=jnp.float32)
    rng = np.random.default_rng(5)
    temp = jnp.asarray(rng.uniform(0.5, 2.0, size=(B, 2, t)), jnp.float32)
    shift = jnp.asarray(rng.normal(size=(B, 2, t)), jnp.float32)
    pos, slopes = _iota(t), np.asarray([0.5, 0.125], np.float32)
    bias = Bias(lambda qp, kp, m: -m * jnp.abs(qp - kp).astype(jnp.float32), pos, pos, slopes)
    got = _run(q, k, v, M.Causal(), (32, 64), ctx={"temp": temp, "shift": shift},
               normalizer=_Tempered(), bias=bias)
    dist = np.abs(pos[0][:, None] - pos[0][None, :]).astype(np.float32)
    # t = (s - m_h |i - j|) temp - shift, written out densely (one kv head)
    g = np.asarray(q, np.float32) * SCALE
    s = np.einsum("bhqd,bkd->bhqk", g, np.asarray(k, np.float32)[:, 0])
    s = (s - slopes[None, :, None, None] * dist) * np.asarray(temp)[..., None]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    out = np.einsum("bhqk,bkd->bhqd", np.exp(s - lse[..., None]), np.asarray(v, np.float32)[:, 0])
    _check(got, (out, lse - np.asarray(shift)), atol=1e-5)


@pytest.mark.parametrize("mask,heads,blocks,kw", [
    (M.Causal(), (4, 2), (32, 32), {}),                         # GQA summed in the dK/dV walk
    (M.Lambda(32, 8), (2, 1), (16, 16), {"t": 256}),            # sink column cut into pieces
    (M.Causal(), (2, 1), (32, 16), {"t": 200, "traced": True,   # padding, traced positions
                                    "seg": (np.arange(200) >= 90).astype(np.int32)[None]}),
], ids=["causal-gqa", "lambda-split-column", "segments-traced-padding"])
def test_backward_matches_dense_vjp(mask, heads, blocks, kw):
    """dQ, dK, dV of the Triton kernels (the reference's out / lse as residuals) against
    ``jax.vjp`` of a dense float32 reference, within 2 % of the largest entry (bf16
    operands)."""
    bwd_checks._check(mask, heads, blocks, bwd=triton_backward.flash_attention_bwd, **kw)


def test_backward_row_context_and_lse_only_pass():
    """LSSAR's second pass (dctx of ``count``, ``lse``, ``q_pos``) and an lse-only pass (its
    first: gradients from ``dlse`` through ``log softplus``)."""
    norm, t = N.Reweighted(p=3), bwd_checks.T
    _, q, k, _ = bwd_checks._inputs(2, (2, 1), t, lssa=True)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (B, t))
    lse0 = bwd_checks._dense(norm, M.Causal(), pos, None)(q.astype(jnp.float32),
                                                           k.astype(jnp.float32), None, {})
    row = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32), lse0.shape)
    ctx = {"count": row + 1.0, "lse": lse0, "q_pos": row}
    bwd = triton_backward.flash_attention_bwd
    bwd_checks._check(M.Causal(), (2, 1), (32, 32), normalizer=norm, pass_idx=1, ctx=ctx,
                      seed=2, bwd=bwd)
    bwd_checks._check(M.Lambda(32, 8), (2, 1), (32, 32), normalizer=norm, values=False,
                      seed=3, bwd=bwd)


SPECS = {  # spec, segment ids, kernel calls (passes x LM-Infinite branches + counting pass)
    "lambda-limit": (lcattn.AttentionSpec(M.Lambda(48, 8), distance_limit=64), False, 2),
    "lssa": (lcattn.AttentionSpec(M.Causal(), N.Softplus()), False, 1),
    "full-segments-lssar": (lcattn.AttentionSpec(M.Full(), N.Reweighted()), True, 3),
    "lambda-alibi": (lcattn.AttentionSpec(M.Lambda(48, 8), position=P.ALiBi()), False, 1),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_backend_equals_the_reference(name, monkeypatch):
    """``attend(backend="pallas_triton")`` over float32 inputs: bf16 operands keep the output
    within 5e-2 of the float32 reference (LSSAR: float32 ``QKᵀ``); gradients through the
    dQ and dK/dV kernels within 3 % of the largest reference gradient (LSSAR at p = 15:
    1 %). The forward kernel ran once per pass and LM-Infinite branch, and for LSSA's
    visible-key count under segment ids; the backward once per pass and branch."""
    from lcattn.backends import pallas_triton

    spec, segments, n_calls = SPECS[name]
    q, k, v = (jnp.swapaxes(x.astype(jnp.float32), 1, 2) for x in _inputs(7, 2, 1, t=128))
    seg = jnp.asarray(np.repeat([0, 1, 2], [50, 40, 38])[None], jnp.int32)
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
    calls, kernel, kernel_bwd = [], triton_forward.flash_attention_pass, \
        triton_backward.flash_attention_bwd
    monkeypatch.setattr(pallas_triton.triton_forward, "flash_attention_pass",
                        lambda *a, **kw: calls.append("fwd") or kernel(*a, **kw))
    monkeypatch.setattr(pallas_triton.triton_backward, "flash_attention_bwd",
                        lambda *a, **kw: calls.append("bwd") or kernel_bwd(*a, **kw))
    out = lcattn.attend(q, k, v, spec, backend="pallas_triton", block_sizes=(32, 32), **kw)
    ref = lcattn.attend(q, k, v, spec, backend="reference", **kw)
    np.testing.assert_allclose(out, ref, atol=5e-2)
    assert float(jnp.mean(jnp.abs(out - ref))) < 1e-2
    assert calls.count("fwd") == n_calls
    cot = jnp.asarray(np.random.default_rng(8).normal(size=q.shape), jnp.float32)
    grads, ref_grads = (jax.grad(lambda q, k, v, b=b: jnp.sum(lcattn.attend(
        q, k, v, spec, backend=b, block_sizes=(32, 32), **kw) * cot), argnums=(0, 1, 2))(q, k, v)
        for b in ("pallas_triton", "reference"))
    rel = 0.01 if isinstance(spec.normalizer, N.Reweighted) else 0.03
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=rel * float(jnp.max(jnp.abs(r))))
    branches = 1 if spec.distance_limit is None else 2
    assert calls.count("bwd") == spec.normalizer.num_passes * branches


def test_causal_softmax_equals_jax_pallas_gpu_mha():
    """An outside cross-check: jax's own Pallas GPU ``mha`` (interpret mode), same bf16
    inputs, causal softmax."""
    from jax.experimental.pallas.ops.gpu import attention as jax_attention

    q, k, v = _inputs(10, 2, 2, t=128)
    theirs = jax_attention.mha(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), None,
                               sm_scale=SCALE, causal=True, interpret=True)
    ours, _ = _run(q, k, v, M.Causal(), (64, 64))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(jnp.swapaxes(theirs, 1, 2),
                                                            np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (128, jnp.float16),
                                     (128, jnp.float32)], ids=["64-bf16", "128-fp16", "128-f32"])
def test_lowers_for_cuda_through_triton(d, dtype):
    """The forward, dQ and dK/dV kernels lower to Triton IR for CUDA with traced positions,
    segment ids, ALiBi, GQA and LSSAR's second pass (its row context): each a custom call
    carrying the serialized IR (compiling it to PTX needs a GPU)."""
    t = 320  # padded to the blocks
    q = jnp.zeros((1, 4, t, d), dtype)
    k = jnp.zeros((1, 2, t, d), dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
    ctx = {n: jnp.ones((1, 4, t), jnp.float32) for n in ("count", "q_pos", "lse")}
    kw = dict(mask=M.Lambda(128, 16), normalizer=N.Reweighted(), pass_idx=1,
              block_sizes=(64, 64), interpret=False, bias=Bias(
                  lambda qp, kp, m: -m * jnp.abs(qp - kp).astype(jnp.float32), pos, pos,
                  jnp.ones((4,), jnp.float32)))

    def f(q, k, v, pos):
        where = dict(q_positions=pos, k_positions=pos, q_segment_ids=pos // 100,
                     kv_segment_ids=pos // 100, **kw)
        out, lse = triton_forward.flash_attention_pass(q, k, v, ctx, **where)
        return triton_backward.flash_attention_bwd(q, k, v, ctx, out, lse, out, lse, **where)

    text = jax.jit(f).trace(q, k, k, pos).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("", "_dq", "_dkv"):
        assert f"block_sparse_flash_attention{name}_triton" in text
    assert text.count('ir = "ML') == 3


@pytest.mark.parametrize("change,message", [
    (dict(d=96), "head_dim of `q` must be a power of two"),
    (dict(dtype=jnp.int8), "must share one of bfloat16, float16, float32"),
    (dict(blocks=(48, 64)), "block_q must be a power of two"),
    (dict(blocks=(64, 512)), "block_k must be a power of two from 16 to 256"),
    (dict(num_warps=3), "`num_warps` must be 1, 2, 4, 8 or 16"),
], ids=["head_dim", "dtype", "block_q", "block_k", "num_warps"])
def test_unsupported_inputs_raise(change, message):
    q = jnp.zeros((B, 2, 128, change.get("d", 64)), change.get("dtype", jnp.bfloat16))
    with pytest.raises(ValueError, match=message):
        triton_forward.flash_attention_pass(
            q, q, q, {}, mask=M.Causal(), normalizer=N.Softmax(), q_positions=_iota(128),
            k_positions=_iota(128), block_sizes=change.get("blocks", (64, 64)),
            num_warps=change.get("num_warps"))


def test_pallas_gpu_hands_other_gpus_to_the_triton_pass(monkeypatch, caplog):
    """On a GPU that is not sm_90 (here: a pretended A100), ``pallas_gpu``'s factory returns
    ``pallas_triton``'s pass and says so; on sm_90 and off GPU it keeps the Mosaic kernels."""
    from lcattn.backends import pallas_gpu

    made = []
    monkeypatch.setattr(pallas_gpu.pallas_triton, "pass_fn",
                        lambda *a: made.append(a) or "triton pass")
    monkeypatch.setattr(pallas_gpu, "compute_capability", lambda: "8.0")
    with caplog.at_level("WARNING", logger="lcattn.backends.pallas_gpu"):
        assert pallas_gpu.pass_fn(None, False) == "triton pass"
    assert made and "compute capability 8.0" in caplog.text
    for cc in ("9.0", None):
        monkeypatch.setattr(pallas_gpu, "compute_capability", lambda cc=cc: cc)
        assert pallas_gpu.pass_fn(None, False) != "triton pass"
    assert len(made) == 1
