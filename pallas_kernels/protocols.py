"""The small protocols that kernels in this package call; lcattn objects satisfy them.

Kernels never import lcattn: they take a mask object and a normalizer object and call only
the methods below, with the shapes stated here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile classes returned by MaskLike.classify


@runtime_checkable
class MaskLike(Protocol):
    """A hashable set of visible (query position, key position) pairs."""

    def __call__(self, q_pos: Any, k_pos: Any) -> Any:
        """Elementwise on broadcast int position arrays (jnp, works on iota tiles) -> bool."""

    def classify(self, q_lo: Any, q_hi: Any, k_lo: Any, k_hi: Any) -> Any:
        """EMPTY/PARTIAL/FULL per tile of inclusive position ranges; numpy in, numpy out;
        jnp in, jnp out; exact (never builds a T x T array)."""


@runtime_checkable
class NormalizerLike(Protocol):
    """An online softmax over per-tile log-weights, with a streaming state (m, l, acc)."""

    num_passes: int

    def uses_values(self, pass_idx: int) -> bool:
        """Whether this pass accumulates values (else it only collects row sums)."""

    def log_weight(self, s: Any, ctx: dict, pass_idx: int) -> Any:
        """Float32 scores ``[..., rows, keys]`` -> log-weights (-inf: weight zero); ``ctx`` holds
        float32 ``[..., rows, 1]`` row arrays. Finite derivative everywhere."""

    def init(self, rows_shape: tuple, dv: int | None) -> Any: ...

    def update(self, state: Any, t: Any, v: Any = None) -> Any: ...

    def merge(self, a: Any, b: Any) -> Any: ...

    def finalize(self, state: Any) -> tuple[Any, Any]:
        """-> ``(out [..., rows, dv] or None, lse [..., rows])``."""


@dataclasses.dataclass(frozen=True)
class Bias:
    """Additive score bias ``fn(q_pos, k_pos, slope) -> float32`` (e.g. ALiBi; elementwise on
    broadcast int32 position tiles: ``[bq, 1]`` / ``[1, bk]`` on TPU, whole tiles on GPU),
    evaluated on the int32 positions ``q_positions [B, Tq]`` / ``k_positions [B, Tk]`` with the
    per-query-head ``slopes [Hq]``; added to ``q k^T`` before ``log_weight``."""

    fn: Callable
    q_positions: Any
    k_positions: Any
    slopes: Any
