"""The static communication plan of ring attention, from ``Mask.classify`` on shard ranges.

``n`` devices on the mesh axis each hold ``L`` consecutive *slots* of a sequence of
``T = n * L`` tokens. A layout says which global token index sits in each slot:

* ``"contiguous"``: device ``r`` holds ``[r*L, (r+1)*L)`` (balanced for Local / Λ masks);
* ``"zigzag"``: device ``r`` holds chunks ``r`` and ``2n-1-r`` of ``L/2`` tokens (balanced for
  Causal: every device gets one early and one late chunk).

Planning assumes positions equal global indices (or, with segment ids, differ like them within
a segment: packed documents with restarting positions). Each device attends to its own keys
locally; the other keys arrive in:

* **hops**: hop ``h`` is one ``ppermute`` by ``shift`` (receiver ``r`` gets sender
  ``(r - shift) mod n``) of the slice ``[lo, hi)`` of the sender's slots: the union over
  receivers of the keys the mask lets them see (a halo for Local, whole shards for Causal).
  Receivers that need nothing from that sender (``active[r]`` False: e.g. device 0 under
  Causal, which ``ppermute`` would hand device ``n-1``'s keys) ignore what they get;
* a **broadcast**: the keys of *key-bounded* mask atoms (``Sinks(g)``: ``k < g``), which many
  receivers need from the same few devices, come in one all-reduce of the ``owners``' slices
  ``[lo, hi)`` (each owner adds its own, the others zeros): a size that does not grow with
  ``n``. ``valid[r]`` drops the keys receiver ``r`` already has (its own, or delivered by a
  hop), so none counts twice.

With segment ids, sinks are data-dependent (every document has its own first tokens) and
chunk boundaries move with each document, so the plan is *widened*: key bounds and chunks are
dropped from the atoms before planning (Λ becomes Causal: every earlier shard is sent).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from lcattn.masks import _BIG, EMPTY, Mask, _Atom

LAYOUTS = ("contiguous", "zigzag")
_UNITS = 64  # planning granularity: at most this many key units per chunk


@dataclasses.dataclass(frozen=True)
class Hop:
    """One ``ppermute``: receiver ``r`` gets slots ``[lo, hi)`` of ``(r - shift) mod n``."""

    shift: int
    lo: int
    hi: int
    active: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class Broadcast:
    """One all-reduce carrying slots ``[lo, hi)`` of each of the ``owners`` (in that order) to
    every device; key ``j`` of them is used by receiver ``r`` iff ``valid[r][j]``."""

    lo: int
    hi: int
    owners: tuple[int, ...]
    valid: tuple[tuple[bool, ...], ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    n: int
    local_len: int
    layout: str
    hops: tuple[Hop, ...]
    broadcast: Broadcast | None

    def keys_received(self) -> int:
        """Key slots one device receives per pass: its hops' slices plus the broadcast's
        (an all-reduce moves about twice that over a ring of links)."""
        hops = sum(h.hi - h.lo for h in self.hops)
        bc = self.broadcast
        return hops + (len(bc.owners) * (bc.hi - bc.lo) if bc else 0)


def global_positions(layout: str, n: int, local_len: int) -> np.ndarray:
    """``int [n, local_len]``: the global token index in each slot of each device."""
    if layout not in LAYOUTS:
        raise ValueError(f"context_layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "contiguous":
        return np.arange(n * local_len).reshape(n, local_len)
    if local_len % 2:
        raise ValueError(f"context_layout='zigzag' needs an even local length (two chunks per "
                         f"device), got {local_len}")
    c = local_len // 2
    return np.stack([np.concatenate([np.arange(r * c, r * c + c),
                                     np.arange((2 * n - 1 - r) * c, (2 * n - r) * c)])
                     for r in range(n)])


def preferred_layout(masks) -> str:
    """``"zigzag"`` if some mask of ``masks`` lets a query see arbitrarily far back (Causal,
    Full: contiguous shards would give the last device ``n`` times the first one's work),
    else ``"contiguous"`` (windows, chunks and sinks are balanced as they are)."""
    for mask in masks:
        if any(a.d_hi >= _BIG // 2 and a.k_hi >= _BIG // 2 and not a.chunk
               for a in mask.atoms()):
            return "zigzag"
    return "contiguous"


def layout_order(layout: str, n: int, seq_len: int) -> np.ndarray:
    """``int [seq_len]``: the token index at each place of a sequence reordered for
    ``layout`` (``x[:, order]``, then split in ``n`` equal shards); ``np.argsort(order)``
    restores token order. Tokens, positions, segment ids, targets and loss weights are all
    reordered alike, so a mean loss is unchanged."""
    per = 2 * n if layout == "zigzag" else n
    if seq_len % per:
        raise ValueError(f"context_layout={layout!r} on {n} devices needs a sequence length "
                         f"divisible by {per}, got {seq_len}")
    return global_positions(layout, n, seq_len // n).reshape(-1)


class _Atoms(Mask):
    """A mask given by its atoms (planning only: ``classify`` and ``count``)."""

    def __init__(self, atoms):
        self._atoms = tuple(atoms)

    def atoms(self):
        return self._atoms


def _widen(atom: _Atom) -> _Atom:
    """``atom`` without key bounds or chunks (a superset valid for any restarting positions)."""
    d_lo, d_hi = atom.d_lo, atom.d_hi
    if atom.chunk:
        d_lo, d_hi = max(d_lo, 1 - atom.chunk), min(d_hi, atom.chunk - 1)
    return _Atom(d_lo, d_hi)


def _runs(pos: np.ndarray) -> list[tuple[int, int, int]]:
    """``(slot_lo, slot_hi, first global index)`` of the consecutive runs of ``pos``."""
    breaks = np.flatnonzero(np.diff(pos) != 1) + 1
    edges = np.concatenate([[0], breaks, [len(pos)]])
    return [(int(a), int(b), int(pos[a])) for a, b in zip(edges[:-1], edges[1:])]


def _needed(mask: Mask, q_pos: np.ndarray, k_pos: np.ndarray, unit: int) -> np.ndarray:
    """bool per key slot: some query of ``q_pos`` sees a key of its ``unit``-slot group."""
    q_runs = _runs(q_pos)
    starts = np.arange(0, len(k_pos), unit)
    need = np.zeros(len(starts), bool)
    for k_lo_slot, k_hi_slot, k0 in _runs(k_pos):
        sel = (starts + unit > k_lo_slot) & (starts < k_hi_slot)
        a = np.maximum(starts[sel], k_lo_slot) - k_lo_slot + k0
        b = np.minimum(starts[sel] + unit, k_hi_slot) - 1 - k_lo_slot + k0
        for q_lo_slot, q_hi_slot, q0 in q_runs:
            q1 = q0 + (q_hi_slot - q_lo_slot) - 1
            need[sel] |= mask.classify(q0, q1, a, b) != EMPTY
    return np.repeat(need, unit)[:len(k_pos)]


def _slice(flags: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(flags)
    return (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)


@functools.lru_cache(maxsize=256)
def make_plan(mask: Mask, n: int, local_len: int, layout: str = "contiguous",
              segments: bool = False) -> Plan:
    """The plan of ``mask`` for ``n`` devices of ``local_len`` slots under ``layout``."""
    pos = global_positions(layout, n, local_len)
    unit = max(1, (local_len // (2 if layout == "zigzag" else 1)) // _UNITS)
    atoms = mask.atoms()
    if segments:
        atoms = tuple(_widen(a) for a in atoms)
    bounded = tuple(a for a in atoms if a.k_hi < _BIG // 2)
    rest = _Atoms(a for a in atoms if a.k_hi >= _BIG // 2)
    # Broadcast: the key-bounded atoms' keys, when they sit on fewer devices than need them.
    sink_keys = max((a.k_hi for a in bounded), default=-1) + 1
    owners = tuple(int(s) for s in np.unique(np.flatnonzero((pos < sink_keys).any(axis=1))))
    broadcast_slots = (pos < sink_keys)
    use_broadcast = bool(bounded and rest.atoms()) and 0 < len(owners) < n - 1
    hop_mask = rest if use_broadcast else _Atoms(atoms)
    hops, delivered = [], np.zeros((n, n, local_len), bool)  # [receiver, sender, slot]
    for shift in range(1, n):
        need = np.zeros((n, local_len), bool)  # [receiver, sender slot]
        for r in range(n):
            s = (r - shift) % n
            if hop_mask.atoms():
                need[r] = _needed(hop_mask, pos[r], pos[s], unit)
        lo, hi = _slice(need.any(axis=0))
        if hi > lo:
            active = tuple(bool(need[r].any()) for r in range(n))
            hops.append(Hop(shift, lo, hi, active))
            for r in range(n):
                if active[r]:
                    delivered[r, (r - shift) % n, lo:hi] = True
    broadcast = None
    if use_broadcast:
        lo, hi = _slice(broadcast_slots[list(owners)].any(axis=0))
        valid = []
        for r in range(n):
            row = []
            for o in owners:
                for slot in range(lo, hi):
                    row.append(bool(o != r and broadcast_slots[o, slot]
                                    and not delivered[r, o, slot]))
            valid.append(tuple(row))
        broadcast = Broadcast(lo, hi, owners, tuple(valid))
    return Plan(n, local_len, layout, tuple(hops), broadcast)
