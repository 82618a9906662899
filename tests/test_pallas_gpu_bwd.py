"""Checks of ``pallas_kernels.gpu.backward`` (the Mosaic GPU dQ and dK/dV kernels) on CPU.

* gradients against ``jax.vjp`` of a dense float32 ``(out, lse)`` written here, with the
  kernels in the Mosaic GPU interpreter (``interpret=True``; the WGMMAs with transposed or
  register operands are plain dots of the same bf16 operands there). The kernels get the
  reference's ``out`` / ``lse`` as residuals, so the backward is checked on its own;
* cross-lowering for CUDA: the compiled kernels (WGMMA, layouts, SMEM) lower for sm_90a.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcattn import masks as M
from lcattn import normalizers as N
from pallas_kernels import block_sparse
from pallas_kernels.gpu import backward

B, T, D = 1, 128, 64
SCALE = 1.0 / D ** 0.5


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32).astype(jnp.bfloat16)


def _dense(normalizer, mask, pos, seg, pass_idx=0):
    """``f(q, k, v, ctx) -> (out, lse)`` in float32 over ``[B, H, T, D]`` (K/V repeated for
    GQA; ``v`` None: lse only), ``ctx {name: [B, H, T]}`` read by ``log_weight``."""

    def f(q, k, v, ctx):
        g = q.shape[1] // k.shape[1]
        k = jnp.repeat(k, g, axis=1)
        vis = mask(pos[:, :, None], pos[:, None, :])[:, None]
        if seg is not None:
            vis = vis & (seg[:, None, :, None] == seg[:, None, None, :])
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        t = normalizer.log_weight(s, {n: c[..., None] for n, c in ctx.items()}, pass_idx)
        t = jnp.where(vis, t, -jnp.inf)
        lse = jax.nn.logsumexp(t, axis=-1)
        if v is None:
            return lse
        p = jnp.where(vis, jnp.exp(t - lse[..., None]), 0.0)
        return jnp.einsum("bhqk,bhkd->bhqd", p, jnp.repeat(v, g, axis=1)), lse

    return f


def _close(got, want, rel=2e-2):
    got, want = np.asarray(got), np.asarray(want)
    err = np.max(np.abs(got - want))
    assert err <= rel * max(np.max(np.abs(want)), 1e-3), (err, np.max(np.abs(want)))


def _inputs(seed, heads, t, lssa=False):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, heads[0], t, D))
    k, v = (rng.normal(size=(B, heads[1], t, D)) for _ in range(2))
    if lssa:  # LSSA's operands: unit rows, q scaled by its row factor
        q = 4.0 * q / np.linalg.norm(q, axis=-1, keepdims=True)
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    else:
        q = q * SCALE
    return rng, *(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16) for x in (q, k, v))


def _check(mask, heads, blocks, *, t=T, seg=None, traced=False, normalizer=N.Softmax(),
           pass_idx=0, ctx=None, values=True, seed=0, bwd=backward.flash_attention_bwd):
    """Kernel gradients (with the reference's out / lse as residuals) against ``jax.vjp`` of
    ``_dense``: dq, dk, dv and, with ``ctx``, dctx. ``bwd``: the backward under test (the
    Mosaic kernels or ``triton_backward``'s)."""
    rng, q, k, v = _inputs(seed, heads, t, lssa=not isinstance(normalizer, N.Softmax))
    v = v if values else None
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (B, t))
    ctx = ctx or {}
    f = _dense(normalizer, mask, pos, seg, pass_idx)
    args = [None if x is None else x.astype(jnp.float32) for x in (q, k, v)]
    res, vjp = jax.vjp(lambda q, k, ctx, v=args[2]: f(q, k, v, ctx), args[0], args[1], ctx)
    _, vjp_v = jax.vjp(lambda v: f(*args[:2], v, ctx), args[2]) if values else (None, None)
    out, lse = res if values else (None, res)
    dlse = jnp.asarray(rng.normal(size=lse.shape), jnp.float32)
    dout = _bf16(rng, out.shape).astype(jnp.float32) if values else None
    dq_want, dk_want, dctx_want = vjp((dout, dlse) if values else dlse)
    kw = {} if seg is None else dict(q_segment_ids=jnp.asarray(seg),
                                     kv_segment_ids=jnp.asarray(seg))
    positions = jnp.asarray(pos) if traced else pos
    dq, dk, dv, dctx = bwd(
        q, k, v, ctx, out, lse, dout, dlse, mask=mask, normalizer=normalizer,
        pass_idx=pass_idx, q_positions=positions, k_positions=positions, block_sizes=blocks,
        interpret=True, **kw)
    for got, want in ((dq, dq_want), (dk, dk_want)):
        assert got.dtype == jnp.float32 and got.shape == want.shape
        _close(got, want)
    if values:
        _close(dv, vjp_v((dout, dlse))[0])
    else:
        assert dv is None
    if ctx:
        assert set(dctx) == set(ctx)
        for name in ctx:
            _close(dctx[name], dctx_want[name])
    else:
        assert dctx is None


@pytest.mark.parametrize("mask,heads,blocks", [
    (M.Causal(), (4, 2), (64, 64)),        # GQA: dK/dV sum two query heads in the kernel
    (M.Local(40), (2, 1), (64, 128)),      # EMPTY tiles skipped; two dK/dV warpgroups
    (M.Lambda(64, 16), (2, 2), (128, 64)),  # sinks + window; two dQ warpgroups
], ids=["causal-gqa", "local", "lambda"])
def test_softmax_gradients_match_dense_vjp(mask, heads, blocks):
    _check(mask, heads, blocks)


def test_sink_column_is_split_across_thread_blocks():
    """Λ's first kv tile (the sinks) is visited by every query tile: its dK/dV list is cut
    into pieces of twice the median list length, one thread block each, and the partial sums
    are added after. The work items cover every list exactly once; gradients as ever."""
    t, blocks, mask = 512, (64, 64), M.Lambda(64, 16)
    pos = np.arange(t, dtype=np.int32)[None]
    lists = block_sparse.block_lists(
        block_sparse.padded_tile_classes(mask, pos, pos, blocks, None, None, t).T)
    items = np.asarray(backward.column_items(lists))
    assert lists.kv_count.tolist() == [8, 2, 2, 2, 2, 2, 2, 1]
    assert items[:2, :3].tolist() == [[0, 0, 4], [0, 4, 8]]   # pieces of 2 x median = 4
    for j, c in enumerate(lists.kv_count):   # each list entry in exactly one item
        mine = items[items[:, 0] == j]
        assert sorted(e for _, s, stop, _ in mine for e in range(s, stop)) == list(range(c))
    _check(mask, (2, 1), blocks, t=t)


def test_segment_ids_traced_positions_and_padding():
    """Positions and segment ids from GMEM rows (traced lists), 200 tokens (padded queries
    and keys: no gradient from or into them), GQA."""
    t = 200
    seg = (np.arange(t) >= 90).astype(np.int32)[None]
    _check(M.Causal(), (2, 1), (64, 64), t=t, seg=seg, traced=True, seed=1)


def test_row_context_gradient_lssar_second_pass():
    """LSSAR's re-weighting pass reads ``count``, ``lse`` (pass 0's) and ``q_pos`` from the row
    context: dctx (the sum over keys of ``dS``'s context part) against the dense vjp."""
    t, mask, norm = T, M.Causal(), N.Reweighted(p=3)
    _, q, k, _ = _inputs(2, (2, 1), t, lssa=True)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (B, t))
    lse0 = _dense(norm, mask, pos, None)(q.astype(jnp.float32), k.astype(jnp.float32), None, {})
    row = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32), lse0.shape)
    ctx = {"count": row + 1.0, "lse": lse0, "q_pos": row}
    _check(mask, (2, 1), (64, 64), normalizer=norm, pass_idx=1, ctx=ctx, seed=2)


def test_lse_only_pass_lssa():
    """A pass without values (LSSAR's pass 0: LSSA row sums): gradients come from ``dlse``
    alone, through ``log softplus``'s derivative."""
    _check(M.Lambda(64, 16), (2, 1), (64, 64), normalizer=N.Reweighted(p=3), values=False,
           seed=3)


@pytest.mark.parametrize("d", [64, 128])
def test_lowers_for_cuda(d):
    """The compiled dQ and dK/dV kernels (WGMMA with transposed and register operands,
    layouts, SMEM) lower for sm_90a without a GPU, bf16, Λ-mask, GQA: iota positions, GMEM
    positions + segment ids, softcap, LSSAR's pass 1 (ctx) and pass 0 (no values), with split
    float32 q, k (default tiles: 64 x 64 at head_dim 128) and without, and 128 x 128 tiles
    (two warpgroups in both kernels)."""
    t, hq, hk = 512, 4, 2
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (B, t))
    S = jax.ShapeDtypeStruct
    v = S((B, hk, t, d), jnp.bfloat16)
    o, row, ids = S((B, hq, t, d), jnp.float32), S((B, hq, t), jnp.float32), S((B, t), jnp.int32)

    def bwd(q, k, v, out, lse, dout, dlse, p, seg, c, *, norm=N.Softmax(), pass_idx=0,
            values=True, traced=False, blocks=None, split=False):
        ctx = {"count": c, "lse": c, "q_pos": c} if pass_idx else {}
        where = (dict(q_positions=p, k_positions=p, q_segment_ids=seg, kv_segment_ids=seg)
                 if traced else dict(q_positions=pos, k_positions=pos))
        return backward.flash_attention_bwd(
            q, k, v if values else None, ctx, out if values else None, lse,
            dout if values else None, dlse, mask=M.Lambda(256, 64), normalizer=norm,
            pass_idx=pass_idx, block_sizes=blocks, split_qk=split, **where)

    for kw in ({}, {"traced": True}, {"norm": N.Softmax(softcap=20.0)},
               {"norm": N.Reweighted(), "pass_idx": 1},
               {"norm": N.Reweighted(), "pass_idx": 1, "split": True},
               {"norm": N.Reweighted(), "values": False, "split": True}, {"blocks": (128, 128)}):
        q, k = (S((B, h, t, d), jnp.float32 if kw.get("split") else jnp.bfloat16)
                for h in (hq, hk))
        lowered = jax.jit(lambda *a, kw=kw: bwd(*a, **kw)).trace(
            q, k, v, o, row, o, row, ids, ids, row).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("mosaic_gpu") >= 2, kw  # the dQ and dK/dV kernels


@pytest.mark.parametrize("change,message", [
    (dict(blocks=(64, 192)), "block_k must be 64, 128 or 256"),
    (dict(d=256, blocks=(256, 256)), "need about .* bytes of shared memory"),
], ids=["block_k", "smem"])
def test_unsupported_inputs_raise(change, message):
    d = change.get("d", D)
    q = jnp.zeros((B, 2, 256, d), jnp.bfloat16)
    lse = jnp.zeros((B, 2, 256), jnp.float32)
    pos = np.broadcast_to(np.arange(256, dtype=np.int32), (B, 256))
    with pytest.raises(ValueError, match=message):
        backward.flash_attention_bwd(q, q, q, {}, q, lse, q, lse, mask=M.Causal(),
                                     normalizer=N.Softmax(), q_positions=pos, k_positions=pos,
                                     block_sizes=change["blocks"])
