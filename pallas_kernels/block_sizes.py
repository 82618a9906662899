"""``BlockSizes``: the tile shape of every block-sparse attention implementation.

One frozen value for the ``xla`` backend, the TPU kernels and the GPU kernels: the forward
pass tiles queries into ``block_q`` rows and keys into ``block_k`` columns; the backward pass
(dQ and dK/dV) uses ``block_q_bwd`` x ``block_k_bwd`` (None: the forward sizes). Sizes larger
than a sequence are clipped to it (``for_lengths``); ``tilings`` gives the padded lengths both
tilings divide. Platform tiling rules (TPU sublanes and lanes) are the kernels' own checks.
"""
from __future__ import annotations

import dataclasses
import math

from pallas_kernels import checks


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Forward ``block_q x block_k`` tiles and backward ``block_q_bwd x block_k_bwd`` tiles.

    Validated on construction (integers >= 1). ``BlockSizes.of(x)`` accepts None (the
    default, 512 x 512 both ways), a ``(block_q, block_k)`` pair (both passes) or a BlockSizes.
    """

    block_q: int = 512
    block_k: int = 512
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            checks.integer("BlockSizes", name, getattr(self, name))
        for name in ("block_q_bwd", "block_k_bwd"):
            checks.integer("BlockSizes", name, getattr(self, name), allow_none=True)

    @classmethod
    def of(cls, value) -> "BlockSizes":
        """``value`` as a BlockSizes: None -> the default, ``(q, k)`` -> both passes."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(*value)
        raise ValueError(f"`block_sizes` must be None, a (block_q, block_k) pair or a "
                         f"BlockSizes, got {value!r}")

    @property
    def forward(self) -> tuple[int, int]:
        """``(block_q, block_k)`` of the forward pass."""
        return int(self.block_q), int(self.block_k)

    @property
    def backward(self) -> tuple[int, int]:
        """``(block_q, block_k)`` of the backward pass (dQ and dK/dV)."""
        return (int(self.block_q if self.block_q_bwd is None else self.block_q_bwd),
                int(self.block_k if self.block_k_bwd is None else self.block_k_bwd))

    @property
    def same_backward(self) -> bool:
        """Whether the backward pass tiles like the forward pass."""
        return self.forward == self.backward


def for_lengths(blocks: tuple[int, int], tq: int, tk: int) -> tuple[int, int]:
    """``blocks`` clipped to sequences of ``tq`` queries and ``tk`` keys."""
    return min(blocks[0], tq), min(blocks[1], tk)


def _axis(length: int, fwd: int, bwd: int) -> tuple[int, int, int]:
    """``(padded length, forward block, backward block)`` along one axis."""
    fwd, bwd = min(fwd, length), min(bwd, length)
    step = math.lcm(fwd, bwd) if max(fwd, bwd) < length else min(fwd, bwd)
    padded = -(-length // step) * step
    return padded, (padded if fwd == length else fwd), (padded if bwd == length else bwd)


def tilings(blocks: BlockSizes, tq: int, tk: int):
    """``((Lq, Lk), forward (bq, bk), backward (bq, bk))`` for ``tq`` queries and ``tk`` keys.

    Sizes are clipped as in ``for_lengths``; ``Lq >= tq`` and ``Lk >= tk`` are the lengths to
    pad to, divided by both tilings: a multiple of the blocks' lcm, or of the smaller block when
    the other covers the whole sequence (it then covers the whole padded one, so TPU's "a
    multiple of the tile or the whole axis" survives padding). Equal forward and backward sizes
    give ``for_lengths`` and the shortest padding to its multiple.
    """
    lq, fq, bq = _axis(tq, blocks.forward[0], blocks.backward[0])
    lk, fk, bk = _axis(tk, blocks.forward[1], blocks.backward[1])
    return (lq, lk), (fq, fk), (bq, bk)
