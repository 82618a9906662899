"""Masks: elementwise definition, exact tile classification and counts against brute force."""
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcattn import masks as M
from pallas_kernels import block_sparse

MASKS = [
    M.Full(), M.Causal(), M.Local(1), M.Local(5), M.Sinks(0), M.Sinks(3), M.Chunked(4),
    M.Chunked(7), M.Lambda(6, 3), M.Lambda(1, 0), M.Lambda(4, 2) & M.Beyond(4),
    M.Causal() & M.Chunked(8), M.Local(3) | M.Sinks(2), (M.Chunked(4) | M.Sinks(5)) & M.Causal(),
    M.Chunked(4) & M.Chunked(8) & M.Full(), M.Sinks(2) | M.Beyond(9),
]


def brute(mask_fn, t_q, t_k):
    """Dense visibility from an independent definition (plain python loops)."""
    return np.array([[mask_fn(i, j) for j in range(t_k)] for i in range(t_q)], bool)


INDEPENDENT = {  # written without the library, per mask class
    "Full": lambda m: lambda i, j: True,
    "Causal": lambda m: lambda i, j: j <= i,
    "Local": lambda m: lambda i, j: 0 <= i - j < m.window,
    "Sinks": lambda m: lambda i, j: j < m.n,
    "Chunked": lambda m: lambda i, j: i // m.size == j // m.size,
    "Lambda": lambda m: lambda i, j: j <= i and (i - j < m.window or j < m.n_global),
}


@pytest.mark.parametrize("mask", [m for m in MASKS if type(m).__name__ in INDEPENDENT], ids=repr)
def test_elementwise_matches_definition(mask):
    t = 23
    expected = brute(INDEPENDENT[type(mask).__name__](mask), t, t)
    got = np.asarray(mask(np.arange(t)[:, None], np.arange(t)[None, :]))
    np.testing.assert_array_equal(got, expected)
    jitted = jax.jit(lambda q, k: mask(q, k))(jnp.arange(t)[:, None], jnp.arange(t)[None, :])
    np.testing.assert_array_equal(np.asarray(jitted), expected)


def _brute_class(dense, q0, q1, k0, k1):
    sub = dense[q0:q1 + 1, k0:k1 + 1]
    return M.EMPTY if not sub.any() else (M.FULL if sub.all() else M.PARTIAL)


@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize("traced", [False, True])
def test_classify_random_tiles_exact(mask, traced):
    t = 48
    dense = np.asarray(mask(np.arange(t)[:, None], np.arange(t)[None, :]))
    rng = np.random.default_rng(zlib.crc32(repr(mask).encode()))
    tiles = np.sort(rng.integers(0, t, size=(400, 2, 2)), axis=-1)
    q0, q1, k0, k1 = tiles[:, 0, 0], tiles[:, 0, 1], tiles[:, 1, 0], tiles[:, 1, 1]
    expected = [_brute_class(dense, *row) for row in zip(q0, q1, k0, k1)]
    args = [jnp.asarray(a) for a in (q0, q1, k0, k1)] if traced else (q0, q1, k0, k1)
    got = mask.classify(*args)
    assert isinstance(got, jax.Array) == traced
    np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_count_matches_brute_force(mask):
    t = 40
    dense = np.asarray(mask(np.arange(t)[:, None], np.arange(t)[None, :]))
    for k_lo, k_hi in [(0, t - 1), (5, 17), (30, 39)]:
        got = mask.count(np.arange(t), k_lo, k_hi)
        np.testing.assert_array_equal(got, dense[:, k_lo:k_hi + 1].sum(1))


@settings(max_examples=60, deadline=None)
@given(window=st.integers(1, 40), n_global=st.integers(0, 20), block=st.integers(1, 16),
       offset=st.integers(0, 10_000), kind=st.sampled_from(["lambda", "chunk", "local|sinks"]))
def test_classify_grid_hypothesis(window, n_global, block, offset, kind):
    mask = {"lambda": M.Lambda(window, n_global),
            "chunk": M.Causal() & M.Chunked(window),
            "local|sinks": M.Local(window) | M.Sinks(n_global)}[kind]
    t = 4 * block
    pos = np.arange(t) + offset
    kpos = np.arange(t) + (offset if kind != "local|sinks" else 0)
    dense = np.asarray(mask(pos[:, None], kpos[None, :]))
    lo, hi = pos[::block], pos[block - 1::block]
    klo, khi = kpos[::block], kpos[block - 1::block]
    got = mask.classify(lo[:, None], hi[:, None], klo[None], khi[None])
    for i, j in itertools.product(range(4), range(4)):
        sub = dense[i * block:(i + 1) * block, j * block:(j + 1) * block]
        want = M.EMPTY if not sub.any() else (M.FULL if sub.all() else M.PARTIAL)
        assert got[i, j] == want, (i, j)


def test_large_positions_int32_traced():
    mask = M.Lambda(2048, 64)
    q = jnp.asarray([2**27, 2**27]), jnp.asarray([2**27 + 511, 2**27 + 511])
    k = jnp.asarray([0, 2**27 - 1024]), jnp.asarray([63, 2**27 - 1])
    np.testing.assert_array_equal(np.asarray(mask.classify(*q, *k)), [M.FULL, M.FULL])
    assert int(mask.count(jnp.asarray(2**27), 0, 2**27)) == 2048 + 64


@pytest.mark.parametrize("bad", [lambda: M.Local(0), lambda: M.Sinks(-1), lambda: M.Chunked(0),
                                 lambda: M.Lambda(0, 4), lambda: M.Lambda(4, -2),
                                 lambda: M.Local(2.5)])
def test_bad_parameters_name_the_parameter(bad):
    with pytest.raises(ValueError, match=r"`(window|n|size|n_global)`"):
        bad()


def test_incompatible_chunks_raise():
    with pytest.raises(ValueError, match="Chunked sizes 4 and 6"):
        (M.Chunked(4) & M.Chunked(6)).atoms()


def test_masks_are_hashable_static_args():
    a, b = M.Lambda(8, 2), M.Lambda(8, 2)
    assert a == b and hash(a) == hash(b) and hash(M.Causal() & M.Local(3)) == hash(
        M.Causal() & M.Local(3))
    f = jax.jit(lambda x, m: m(x[:, None], x[None, :]).sum(), static_argnums=1)
    assert int(f(jnp.arange(10), a)) == int(np.asarray(a(np.arange(10)[:, None],
                                                          np.arange(10)[None])).sum())


@pytest.mark.parametrize("mask", [M.Causal(), M.Lambda(8, 4), M.Chunked(8), M.Full()], ids=repr)
@pytest.mark.parametrize("traced", [False, True])
def test_block_lists_visit_exactly_nonempty_tiles(mask, traced):
    t, bq, bk = 64, 4, 8
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
    pos = jnp.asarray(pos) if traced else pos
    lists = block_sparse.block_lists(block_sparse.tile_classes(mask, pos, pos, bq, bk))
    assert lists.static != traced
    dense = np.asarray(mask(np.arange(t)[:, None], np.arange(t)[None, :]))
    for i in range(t // bq):
        want = [j for j in range(t // bk) if dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()]
        n = int(lists.kv_count[i])
        assert list(np.asarray(lists.kv_index[i, :n])) == want
        full = [dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].all() for j in want]
        assert list(np.asarray(lists.kv_full[i, :n])) == full
    if not traced and isinstance(mask, M.Lambda):
        assert lists.kv_index.shape[1] < t // bk  # the grid is narrower than dense


def test_segment_ids_refine_tile_classes():
    t, blk = 16, 4
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (1, t))
    seg = jnp.asarray(np.repeat([[0, 1, 2, 3]], 4, axis=1))  # one segment per block
    cls = np.asarray(block_sparse.tile_classes(M.Full(), jnp.asarray(pos), jnp.asarray(pos),
                                               blk, blk, seg, seg))
    np.testing.assert_array_equal(cls, np.diag([M.FULL] * 4))
