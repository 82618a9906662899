"""Attention masks as lazy, hashable objects over absolute token positions.

A mask answers three questions without ever building a ``T x T`` array:

* ``mask(q_pos, k_pos) -> bool``: elementwise on broadcast position arrays (jnp or numpy; works
  under ``jit`` and inside Pallas kernels on iota tiles).
* ``mask.classify(q_lo, q_hi, k_lo, k_hi) -> int8``: EMPTY / PARTIAL / FULL for tiles of
  contiguous position ranges (inclusive bounds), vectorized over any number of tiles.
* ``mask.count(q_pos, k_lo, k_hi) -> int``: how many keys in ``[k_lo, k_hi]`` query ``q_pos``
  sees (``N_i`` of LSSA).

Every mask is, internally, a union of *atoms*; an atom is the set of position pairs with
``d_lo <= q - k <= d_hi``, ``k_lo <= k <= k_hi`` and (optionally) ``q // c == k // c``.
Counting the pairs of an atom inside a rectangle has a closed form, so counts of unions follow
by inclusion-exclusion and classification is exact: EMPTY iff no pair is visible, FULL iff all
are. Functions pick numpy (int64, static metadata) or jnp (int32, traced) from their inputs; in
int32 a tile may hold at most ``2**31`` pairs and positions must stay below ``2**28``.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcattn import checks

EMPTY, PARTIAL, FULL = 0, 1, 2
_BIG = 2**30  # stands for +/- infinity in band and key-range bounds


def _xp(*arrays):
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _as_int(xp, a):
    return xp.asarray(a, dtype=np.int64 if xp is np else jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Atom:
    """Pairs with ``d_lo <= q - k <= d_hi``, ``k_lo <= k <= k_hi``, same ``chunk`` (0: any)."""

    d_lo: int = -_BIG
    d_hi: int = _BIG
    k_lo: int = -_BIG
    k_hi: int = _BIG
    chunk: int = 0

    def __and__(self, other: "_Atom") -> "_Atom | None":
        a, b = sorted((self.chunk, other.chunk))
        if a and b % a:
            raise ValueError(
                f"Chunked sizes {a} and {b} cannot be intersected: one must divide the other")
        atom = _Atom(max(self.d_lo, other.d_lo), min(self.d_hi, other.d_hi),
                     max(self.k_lo, other.k_lo), min(self.k_hi, other.k_hi), a or b)
        return None if atom.d_lo > atom.d_hi or atom.k_lo > atom.k_hi else atom


def _sum_clip(xp, a, b, n):
    """``sum_{x=a..b} clip(x, 0, n)`` for integer arrays (zero when ``a > b``)."""
    top = xp.maximum(b - xp.maximum(a, n) + 1, 0) * n
    lo, hi = xp.maximum(a, 1), xp.minimum(b, n - 1)
    m = xp.maximum(hi - lo + 1, 0)
    s = lo + hi
    tri = xp.where(s % 2 == 0, (s // 2) * m, s * (m // 2))
    return top + xp.where(m > 0, tri, 0)


def _band_pairs(xp, q0, q1, k0, k1, d_lo, d_hi):
    """Number of ``(q, k)`` in ``[q0,q1] x [k0,k1]`` with ``d_lo <= q - k <= d_hi``."""
    nk = xp.maximum(k1 - k0 + 1, 0)
    ok = (q1 >= q0) & (nk > 0)

    def at_most(t):  # pairs with q - k <= t; per row q: clip(k1 - q + t + 1, 0, nk)
        t = xp.clip(t, -_BIG, _BIG)
        return _sum_clip(xp, k1 + t + 1 - q1, k1 + t + 1 - q0, nk)

    return xp.where(ok, at_most(d_hi) - at_most(d_lo - 1), 0)


def _atom_pairs(xp, atom: _Atom, q0, q1, k0, k1):
    """Visible pairs of one atom in the tiles ``[q0,q1] x [k0,k1]`` (broadcast)."""
    k0 = xp.maximum(k0, atom.k_lo)
    k1 = xp.minimum(k1, atom.k_hi)
    if not atom.chunk:
        return _band_pairs(xp, q0, q1, k0, k1, atom.d_lo, atom.d_hi)
    c = atom.chunk
    # Chunks met by both ranges: first and last may be clipped, the ones between are whole.
    ca = xp.maximum(q0 // c, k0 // c)
    cb = xp.minimum(q1 // c, k1 // c)

    def in_chunk(ch):
        lo, hi = ch * c, ch * c + c - 1
        return _band_pairs(xp, xp.maximum(q0, lo), xp.minimum(q1, hi),
                           xp.maximum(k0, lo), xp.minimum(k1, hi), atom.d_lo, atom.d_hi)

    whole = _band_pairs(xp, 0, c - 1, 0, c - 1, atom.d_lo, atom.d_hi)
    total = in_chunk(ca) + xp.where(cb > ca, in_chunk(cb), 0)
    total = total + xp.maximum(cb - ca - 1, 0) * whole
    return xp.where((cb >= ca) & (k1 >= k0), total, 0)


class Mask:
    """Base class: a set of visible ``(query position, key position)`` pairs."""

    def __call__(self, q_pos, k_pos):
        raise TypeError(f"{type(self).__name__} must define __call__")

    def atoms(self) -> tuple[_Atom, ...]:
        raise TypeError(f"{type(self).__name__} must define atoms()")

    def __and__(self, other: "Mask") -> "Mask":
        return And(self, other)

    def __or__(self, other: "Mask") -> "Mask":
        return Or(self, other)

    def pair_count(self, q_lo, q_hi, k_lo, k_hi):
        """Visible pairs in tiles ``[q_lo, q_hi] x [k_lo, k_hi]`` (inclusive; broadcast)."""
        xp = _xp(q_lo, q_hi, k_lo, k_hi)
        q0, q1, k0, k1 = (_as_int(xp, a) for a in (q_lo, q_hi, k_lo, k_hi))
        atoms = self.atoms()
        total = xp.zeros(np.broadcast_shapes(q0.shape, q1.shape, k0.shape, k1.shape),
                         q0.dtype)
        for r in range(1, len(atoms) + 1):  # inclusion-exclusion over the union
            for group in itertools.combinations(atoms, r):
                inter = group[0]
                for a in group[1:]:
                    inter = inter & a if inter is not None else None
                if inter is not None:
                    sign = 1 if r % 2 else -1
                    total = total + sign * _atom_pairs(xp, inter, q0, q1, k0, k1)
        return total

    def classify(self, q_lo, q_hi, k_lo, k_hi):
        """EMPTY (0), PARTIAL (1) or FULL (2) per tile, exactly; int8 array."""
        xp = _xp(q_lo, q_hi, k_lo, k_hi)
        q0, q1, k0, k1 = (_as_int(xp, a) for a in (q_lo, q_hi, k_lo, k_hi))
        pairs = self.pair_count(q0, q1, k0, k1)
        area = xp.maximum(q1 - q0 + 1, 0) * xp.maximum(k1 - k0 + 1, 0)
        out = xp.where(pairs == 0, EMPTY, xp.where(pairs == area, FULL, PARTIAL))
        return out.astype(np.int8)

    def count(self, q_pos, k_lo, k_hi):
        """Number of keys at positions ``k_lo..k_hi`` visible to a query at ``q_pos``."""
        return self.pair_count(q_pos, q_pos, k_lo, k_hi)


def _true_like(q_pos, k_pos):
    return (q_pos - k_pos) == (q_pos - k_pos)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every key is visible."""

    def __call__(self, q_pos, k_pos):
        return _true_like(q_pos, k_pos)

    def atoms(self):
        return (_Atom(),)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Keys with ``k_pos <= q_pos``."""

    def __call__(self, q_pos, k_pos):
        return q_pos >= k_pos

    def atoms(self):
        return (_Atom(d_lo=0),)


@dataclasses.dataclass(frozen=True)
class Local(Mask):
    """Keys with ``0 <= q_pos - k_pos < window`` (causal sliding window, query included)."""

    window: int

    def __post_init__(self):
        checks.integer("Local", "window", self.window, minimum=1)

    def __call__(self, q_pos, k_pos):
        d = q_pos - k_pos
        return (d >= 0) & (d < self.window)

    def atoms(self):
        return (_Atom(d_lo=0, d_hi=self.window - 1),)


@dataclasses.dataclass(frozen=True)
class Beyond(Mask):
    """Keys at distance ``q_pos - k_pos >= distance`` (a causal mask's part outside a window)."""

    distance: int

    def __post_init__(self):
        checks.integer("Beyond", "distance", self.distance, minimum=0)

    def __call__(self, q_pos, k_pos):
        return q_pos - k_pos >= self.distance

    def atoms(self):
        return (_Atom(d_lo=self.distance),)


@dataclasses.dataclass(frozen=True)
class Sinks(Mask):
    """The first ``n`` positions (``k_pos < n``), visible to every query (not causal by itself)."""

    n: int

    def __post_init__(self):
        checks.integer("Sinks", "n", self.n, minimum=0)

    def __call__(self, q_pos, k_pos):
        return (k_pos < self.n) & _true_like(q_pos, k_pos)

    def atoms(self):
        return (_Atom(k_hi=self.n - 1),) if self.n else ()


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
    """Keys in the same chunk of ``size`` positions (``q_pos // size == k_pos // size``)."""

    size: int

    def __post_init__(self):
        checks.integer("Chunked", "size", self.size, minimum=1)

    def __call__(self, q_pos, k_pos):
        return (q_pos // self.size) == (k_pos // self.size)

    def atoms(self):
        return (_Atom(chunk=self.size),)


@dataclasses.dataclass(frozen=True)
class And(Mask):
    """Pairs visible under both masks (``a & b``)."""

    a: Mask
    b: Mask

    def __call__(self, q_pos, k_pos):
        return self.a(q_pos, k_pos) & self.b(q_pos, k_pos)

    def atoms(self):
        out = []
        for x in self.a.atoms():
            for y in self.b.atoms():
                z = x & y
                if z is not None and z not in out:
                    out.append(z)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class Or(Mask):
    """Pairs visible under either mask (``a | b``)."""

    a: Mask
    b: Mask

    def __call__(self, q_pos, k_pos):
        return self.a(q_pos, k_pos) | self.b(q_pos, k_pos)

    def atoms(self):
        return tuple(dict.fromkeys(self.a.atoms() + self.b.atoms()))


@dataclasses.dataclass(frozen=True)
class Lambda(Mask):
    """LM-Infinite's Λ-mask: ``Causal() & (Local(window) | Sinks(n_global))``."""

    window: int
    n_global: int = 0

    def __post_init__(self):
        checks.integer("Lambda", "window", self.window, minimum=1)
        checks.integer("Lambda", "n_global", self.n_global, minimum=0)

    @property
    def composite(self) -> Mask:
        return Causal() & (Local(self.window) | Sinks(self.n_global))

    def __call__(self, q_pos, k_pos):
        d = q_pos - k_pos
        return (d >= 0) & ((d < self.window) | (k_pos < self.n_global))

    def atoms(self):
        return self.composite.atoms()


def tile_bounds(positions, block: int, xp=None):
    """Per-tile ``(lo, hi)`` of positions ``[..., T]`` cut into tiles of ``block`` (T % block == 0).

    The bounds are taken over all leading (batch) axes, so one tile list serves the batch.
    Positions that are not contiguous inside a tile make the bounds conservative (a tile may
    be called PARTIAL that is FULL), never wrong.
    """
    xp = xp or _xp(positions)
    p = xp.asarray(positions)
    t = p.shape[-1]
    if t % block:
        raise ValueError(f"sequence length {t} is not a multiple of block {block}")
    p = p.reshape(-1, t // block, block)
    return p.min(axis=(0, 2)), p.max(axis=(0, 2))


__all__: Sequence[str] = (
    "EMPTY", "PARTIAL", "FULL", "Mask", "Full", "Causal", "Local", "Beyond", "Sinks", "Chunked",
    "And", "Or", "Lambda", "tile_bounds")
