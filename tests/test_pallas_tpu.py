"""Checks of the ``pallas_tpu`` backend (Mosaic TPU kernels, run here in TPU interpret mode)
beyond ``test_backends.py`` (which compares it with the reference over the shared cases): the
block lists against brute force; empty tiles never read; grids that walk only visited tiles;
jax's own splash attention as an outside check; lowering to Mosaic for a real TPU; a model
trained through the kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lcattn
from lcattn import masks as M
from lcattn import normalizers as N
from lcattn import positions as P
from pallas_kernels import block_sparse, tpu
from pallas_kernels.protocols import EMPTY, FULL
from tests.helpers import assert_close, qkv


def test_empty_tiles_are_never_read():
    """NaN in every kv block the lists skip: the output stays finite and right."""
    b, tk, hk, d = 1, 128, 1, 8
    spec = lcattn.AttentionSpec(M.Local(16), N.Softmax(), P.RoPE())
    q, k, v = qkv(3, b, 8, tk, 2, hk, d)
    qpos = np.arange(tk - 8, tk, dtype=np.int32)
    want = lcattn.attend(q, k, v, spec, q_positions=qpos, backend="reference")
    poison = jnp.arange(tk)[None, :, None, None] < tk - 32  # blocks 0..2 of 4 are EMPTY
    k_bad, v_bad = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    got = lcattn.attend(q, k_bad, v_bad, spec, q_positions=qpos, backend="pallas_tpu",
                        block_sizes=(8, 32))
    assert_close(got, want, jnp.float32)


def _brute_tiles(mask, q_pos, k_pos, bq, bk, q_seg=None, kv_seg=None):
    vis = mask(q_pos[..., :, None], k_pos[..., None, :])
    if q_seg is not None:
        vis = vis & (q_seg[..., :, None] == kv_seg[..., None, :])
    b, tq, tk = vis.shape
    tiles = vis.reshape(b, tq // bq, bq, tk // bk, bk)
    return tiles.any(axis=(0, 2, 4)), tiles.all(axis=(0, 2, 4))


@pytest.mark.parametrize("mask", [M.Causal(), M.Local(40), M.Chunked(48), M.Lambda(40, 8),
                                  M.Lambda(40, 8) & M.Beyond(40), M.Full()], ids=repr)
@pytest.mark.parametrize("segments", [False, True])
def test_visited_tiles_are_exactly_the_nonempty_tiles(mask, segments):
    rng = np.random.default_rng(0)
    t, bq, bk = 256, 16, 32
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
    seg = np.sort(rng.integers(0, 4, size=(2, t)), axis=1).astype(np.int32) if segments else None
    any_, all_ = _brute_tiles(mask, pos, pos, bq, bk, seg, seg)
    segs = (jnp.asarray(seg), jnp.asarray(seg)) if segments else (None, None)
    for lists in (block_sparse.block_lists(block_sparse.tile_classes(mask, pos, pos, bq, bk,
                                                                     *segs)),):
        index, count, full = (np.asarray(x) for x in (lists.kv_index, lists.kv_count,
                                                      lists.kv_full))
        visited = np.zeros_like(any_)
        flagged = np.zeros_like(any_)
        for i in range(len(count)):
            row = index[i, :count[i]]
            assert len(set(row.tolist())) == count[i]  # each tile once
            visited[i, row] = True
            flagged[i, row] = full[i, :count[i]]
            assert not full[i, count[i]:].any()
        np.testing.assert_array_equal(visited, any_)
        np.testing.assert_array_equal(flagged, all_ & any_)
        sched = block_sparse.schedule(lists, group=2)
        active = (np.asarray(sched.flags) & block_sparse.Schedule.ACTIVE) != 0
        pairs = {(int(i), int(j)) for i, j in zip(np.asarray(sched.row)[active],
                                                   np.asarray(sched.col)[active])}
        assert pairs == set(zip(*np.nonzero(any_)))
        assert active.sum() == 2 * any_.sum()  # each tile once per head of the group
        if lists.static:
            assert sched.steps == 2 * np.maximum(count, 1).sum()  # no padding steps
            stats = block_sparse.visit_stats(sched)
            assert stats["visited_tiles"] == 2 * int(any_.sum())
            assert stats["full_tiles"] == 2 * int(all_.sum())


def test_lambda_grid_width_does_not_grow_with_length():
    widths = []
    for t in (1024, 4096, 16384):
        pos = np.arange(t, dtype=np.int32)[None]
        lists = block_sparse.block_lists(block_sparse.tile_classes(M.Lambda(256, 16), pos, pos,
                                                                   128, 128))
        widths.append(lists.kv_index.shape[1])
    assert widths == [4, 4, 4]  # the sink block plus the window's 3 blocks
    pos = np.arange(4096, dtype=np.int32)[None]
    classes = block_sparse.tile_classes(M.Lambda(256, 16), pos, pos, 128, 128)
    assert (classes == FULL).sum() > 0 and (classes == EMPTY).sum() > 0


def test_kernel_grids_walk_only_the_visited_tiles():
    """Record the grid points the interpreter runs: forward, dQ and dK/dV each take one step
    per visited tile (per head), not ``nq * nk``, the dK/dV grid included despite the sinks."""
    from jax.experimental.pallas import tpu as pltpu
    points = []

    def record(token, point, core):  # the interpreter's grid-point hook
        points.append(tuple(int(x) for x in point))
        return token

    t, bq, bk, hq, hk = 512, 64, 64, 2, 1
    mask = M.Lambda(128, 8)
    pos = np.arange(t, dtype=np.int32)[None]
    classes = block_sparse.tile_classes(mask, pos, pos, bq, bk)
    visited = int((classes != EMPTY).sum())
    assert visited == 1 + 2 + 3 + 5 * 4 < (t // bq) * (t // bk)  # sink + window of 3
    q, k, v = qkv(0, 1, t, t, hq, hk, 8)
    spec = lcattn.AttentionSpec(mask, N.Softmax())
    params = pltpu.InterpretParams(grid_point_recorder=record)
    jax.grad(lambda q_: jnp.sum(lcattn.attend(q_, k, v, spec, backend="pallas_tpu",
                                              block_sizes=(bq, bk), interpret=params)))(q)
    assert len(points) == 3 * hq * visited  # forward, dQ, dK/dV
    stats = block_sparse.visit_stats(block_sparse.schedule(block_sparse.block_lists(classes)))
    assert stats["grid_steps"] == stats["visited_tiles"] == visited
    assert stats["block_fetches"] <= visited


def _splash(q, k, v, mask_np):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    heads = q.shape[2]
    kernel = sa.make_splash_mha_single_device(
        sa.MultiHeadMask([sa.NumpyMask(mask_np)] * heads),
        block_sizes=sa.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128),
        interpret=True)
    swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, H, D] -> [B, H, T, D]
    return swap(jax.vmap(kernel)(swap(q), swap(k), swap(v)))


@pytest.mark.parametrize("mask", [M.Causal(), M.Local(100)], ids=repr)
def test_matches_jax_splash_attention(mask):
    t = 256
    q, k, v = qkv(4, 2, t, t, 2, 2, 64)
    spec = lcattn.AttentionSpec(mask, N.Softmax(scale=1.0), P.NoPE())
    pos = np.arange(t)
    want = _splash(q, k, v, np.asarray(mask(pos[:, None], pos[None, :])))
    got = lcattn.attend(q, k, v, spec, backend="pallas_tpu", block_sizes=(128, 128))
    assert_close(got, want, jnp.float32)


def test_hardware_tiling_is_checked_outside_interpret_mode():
    with pytest.raises(ValueError, match="block_k must be a multiple of 128"):
        tpu.block_shape(1024, 1024, (128, 96), interpret=False)
    assert tpu.block_shape(100, 1000, (128, 512), interpret=False) == (100, 512)
    assert tpu.block_shape(64, 64, (16, 24), interpret=True) == (16, 24)


@pytest.mark.parametrize("spec,segments", [
    (lcattn.AttentionSpec(M.Causal(), N.Softmax()), False),
    (lcattn.AttentionSpec(M.Lambda(256, 64), N.Reweighted(), distance_limit=256), True),
    (lcattn.AttentionSpec(M.Chunked(256), N.Softplus(), P.ALiBi()), False)], ids=repr)
def test_lowers_to_mosaic_for_a_tpu(spec, segments):
    """Forward and backward lower to Mosaic TPU custom calls (cross-lowered from this CPU for an
    abstract TPU v5e; catches unsupported ops and illegal block shapes, not compiler limits)."""
    from jax._src import mesh as mesh_lib  # AbstractDevice: no public constructor yet
    b, t = 1, 1024
    q = jnp.zeros((b, t, 4, 128), jnp.bfloat16)
    k = jnp.zeros((b, t, 2, 128), jnp.bfloat16)
    seg = jnp.zeros((b, t), jnp.int32) if segments else None

    def loss(q_, k_, v_):
        out = lcattn.attend(q_, k_, v_, spec, backend="pallas_tpu", block_sizes=(256, 256),
                            interpret=False, q_segment_ids=seg, kv_segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32))

    device = mesh_lib.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
            lowering_platforms=("tpu",)).as_text()
    passes = spec.normalizer.num_passes * (2 if spec.distance_limit else 1)
    assert text.count("tpu_custom_call") >= 3 * passes  # forward, dQ, dK/dV per pass


def test_decoder_lm_trains_through_the_kernels():
    """A two-layer DecoderLM (Λ-mask + LSSA layers, packed segments): the loss and its parameter
    gradient through ``backend="pallas_tpu"`` equal the ``xla`` backend's."""
    from flax import nnx

    from lcattn.model import DecoderLM
    specs = (lcattn.AttentionSpec(M.Lambda(8, 2), N.Softmax(), distance_limit=8),
             lcattn.AttentionSpec(M.Causal(), N.Softplus()))
    model = DecoderLM(vocab_size=32, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8,
                      mlp_dim=32, attention_specs=specs, rngs=nnx.Rngs(0))
    graph, params = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (1, 16)), jnp.int32)
    seg = jnp.asarray(np.repeat([[0, 1]], 8, axis=1), jnp.int32)

    def loss(p, backend):
        logits = nnx.merge(graph, p)(tokens, segment_ids=seg, backend=backend)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # as training runs
    want, want_g = value_and_grad(params, "xla")
    got, got_g = value_and_grad(params, "pallas_tpu")
    assert_close(got, want, jnp.float32)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        assert_close(g, w, jnp.float32, scale_by_max=True)
