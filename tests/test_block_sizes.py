"""``BlockSizes``: validation, padded tilings, and forward / backward tile sizes that really reach
the ``xla`` backend and the TPU kernels (interpret mode), both still matching the reference."""
import re

import jax.numpy as jnp
import numpy as np
import pytest

import lcattn
from lcattn import masks as M
from lcattn import normalizers as N
from lcattn import positions as P
from lcattn.backends import pallas_tpu, xla
from pallas_kernels import tpu
from pallas_kernels.block_sizes import BlockSizes, tilings
from pallas_kernels.tpu import kernels
from tests.helpers import assert_close, outputs_and_grads, qkv

BLOCKS = BlockSizes(16, 32, block_q_bwd=8, block_k_bwd=16)
GROUP = 2  # Hq // Hkv of the backend cases


@pytest.mark.parametrize("kwargs,message", [
    (dict(block_q=0), "BlockSizes: `block_q` must be an integer >= 1, got 0"),
    (dict(block_k=True), "BlockSizes: `block_k` must be an integer >= 1, got True"),
    (dict(block_k=8.0), "BlockSizes: `block_k` must be an integer >= 1, got 8.0"),
    (dict(block_q_bwd=-8), "BlockSizes: `block_q_bwd` must be None or an integer >= 1, got -8"),
    (dict(block_k_bwd="8"), "BlockSizes: `block_k_bwd` must be None or an integer >= 1, got '8'"),
])
def test_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BlockSizes(**kwargs)


@pytest.mark.parametrize("value", [8, (8,), (8, 8, 8), "8x8"])
def test_of_rejects_other_types(value):
    with pytest.raises(ValueError, match=re.escape("`block_sizes` must be None, a (block_q, "
                                                   "block_k) pair or a BlockSizes")):
        BlockSizes.of(value)


def test_of_forward_and_backward():
    assert BlockSizes.of(None) == BlockSizes(512, 512)
    pair = BlockSizes.of((8, np.int64(16)))
    assert pair.forward == pair.backward == (8, 16) and pair.same_backward
    assert BlockSizes.of(BLOCKS) is BLOCKS
    assert BLOCKS.forward == (16, 32) and BLOCKS.backward == (8, 16) and not BLOCKS.same_backward
    assert BlockSizes(16, 32, block_k_bwd=8).backward == (16, 8)


@pytest.mark.parametrize("blocks,tq,tk,want", [
    (BlockSizes(8, 8), 37, 37, ((40, 40), (8, 8), (8, 8))),  # equal sizes: pad to the block
    (BlockSizes(16, 16, 8, 8), 5, 5, ((5, 5), (5, 5), (5, 5))),  # both clipped
    (BLOCKS, 40, 40, ((48, 64), (16, 32), (8, 16))),
    (BlockSizes(12, 20, 8, 8), 41, 41, ((48, 80), (12, 20), (8, 8))),  # lcm
    (BlockSizes(128, 128, 64, 64), 100, 100, ((128, 128), (128, 128), (64, 64))),  # whole axis
])
def test_tilings(blocks, tq, tk, want):
    assert tilings(blocks, tq, tk) == want


@pytest.mark.parametrize("module", [xla, pallas_tpu])
def test_pass_fns_validate(module):
    with pytest.raises(ValueError, match=re.escape("BlockSizes: `block_q` must be")):
        module.pass_fn((0, 8))


def test_tpu_tiling_check_covers_backward_sizes():
    with pytest.raises(ValueError, match="block_k_bwd must be a multiple of 128"):
        tpu.block_shape(1024, 1024, (128, 96), interpret=False, backward=True)
    q = jnp.zeros((1, 1, 1024, 8))
    pos = np.arange(1024, dtype=np.int32)[None]
    with pytest.raises(ValueError, match="block_q_bwd must be a multiple of 8"):
        tpu.flash_attention_pass(q, q, q, {}, mask=M.Causal(), normalizer=N.Softmax(),
                                 q_positions=pos, k_positions=pos, interpret=False,
                                 block_sizes=BlockSizes(128, 128, 12, 128))


def _record_tiles(backend, monkeypatch):
    """Collect the (block_q, block_k) each pass direction really runs with."""
    seen = {"forward": set(), "backward": set()}

    def spy(module, name, direction, tiles):
        fn = getattr(module, name)

        def wrapped(*args, **kw):
            seen[direction].add(tiles(*args))
            return fn(*args, **kw)

        monkeypatch.setattr(module, name, wrapped)

    if backend == "xla":  # blocked q [nq, B, Hkv, G*bq, D], k [nk, B, Hkv, bk, D]
        blocked = lambda cfg, q, k, *_: (q.shape[3] // GROUP, k.shape[3])  # noqa: E731
        spy(xla, "_forward", "forward", blocked)
        spy(xla, "_backward", "backward", blocked)
    else:
        static = lambda st, *_: (st.block_q, st.block_k)  # noqa: E731
        spy(kernels, "forward_call", "forward", static)
        spy(kernels, "dq_call", "backward", static)
        spy(kernels, "dkv_call", "backward", static)
    return seen


# The tiling code is the same for every normalizer: LSSAR (two passes) on the cheap backend
# only, since TPU interpret mode takes ~50 s for it.
@pytest.mark.parametrize("backend, norm", [("xla", N.Softmax()), ("xla", N.Reweighted()),
                                           ("pallas_tpu", N.Softmax())], ids=str)
def test_backward_tiles_differ_from_forward(backend, norm, monkeypatch):
    """Forward 16 x 32, backward 8 x 16, T = 40 (a multiple of neither), Λ-mask with distance
    limit, GQA: outputs and q/k/v gradients match the reference."""
    spec = lcattn.AttentionSpec(M.Lambda(12, 3), norm, P.RoPE(), distance_limit=10)
    q, k, v = qkv(3, 1, 40, 40, 2 * GROUP, 2, 8)
    want_out, want_grads = outputs_and_grads(q, k, v, spec, "reference")
    seen = _record_tiles(backend, monkeypatch)
    out, grads = outputs_and_grads(q, k, v, spec, backend, block_sizes=BLOCKS)
    assert seen == {"forward": {(16, 32)}, "backward": {(8, 16)}}
    assert_close(out, want_out, jnp.float32)
    for got, want in zip(grads, want_grads):
        assert_close(got, want, jnp.float32, scale_by_max=True)
