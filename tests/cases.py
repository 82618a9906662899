"""The attention cases every backend is checked on, and each backend's plan of them.

Shared tables (masks, normalizers, head layouts, dtypes, position and normalizer options) and
spec construction live here; ``BACKENDS`` says per backend the sequence length and blocks it
runs at and whether it runs the full product of the tables (cheap backends) or a covering
design (slow ones: every crossed combination once, the other axes rotating through it).
Adding a backend to ``tests/test_backends.py`` is one ``BACKENDS`` entry.
"""
import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np

import lcattn
from lcattn import masks as M
from lcattn import normalizers as N
from lcattn import positions as P
from tests.helpers import packed_documents, qkv

NORMS = {"softmax": N.Softmax(), "lssa": N.Softplus(), "lssar": N.Reweighted()}
HEADS = {"mha": (2, 2), "gqa": (4, 2), "mqa": (2, 1)}  # (query heads, kv heads)
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
MASKS = ("full", "causal", "local", "chunked", "lambda", "lambda_limit")
SEGMENT_MASKS = ("causal", "full", "lambda_limit")  # packed documents, on cheap backends
NORM_OPTIONS = {"softcap": N.Softmax(softcap=3.0), "scale": N.Softmax(scale=0.5),
                "lssa": N.Softplus(), "lssar_p2": N.Reweighted(p=2, warmup_rows=5)}
POSITIONS = {"alibi": P.ALiBi(), "nope": P.NoPE(), "yarn": P.RoPE(scaling=P.YaRN(4, 16))}
DECODE_ROWS = (1, 5)  # queries at the end of a DECODE_KEYS-long cache
DECODE_KEYS = 40


@dataclasses.dataclass(frozen=True)
class Backend:
    """How ``name`` is tested: batch ``batch`` x ``seq`` tokens (not a multiple of ``blocks``,
    so padding is exercised) with masks sized by ``local``, ``chunk``, ``window``/``sinks``
    (Λ) and ``limit`` (LM-Infinite distance limit); ``decode_blocks`` for a few query rows;
    ``exhaustive``: the full product of the tables, else a covering design."""

    name: str
    exhaustive: bool
    batch: int
    seq: int
    blocks: tuple[int, int]
    decode_blocks: tuple[int, int]
    local: int
    chunk: int
    window: int
    sinks: int
    limit: int

    def mask(self, name):
        """``(mask, distance_limit)`` for a name in ``MASKS``, sized for this backend."""
        return {"full": (M.Full(), None), "causal": (M.Causal(), None),
                "local": (M.Local(self.local), None), "chunked": (M.Chunked(self.chunk), None),
                "lambda": (M.Lambda(self.window, self.sinks), None),
                "lambda_limit": (M.Lambda(self.window, self.sinks), self.limit)}[name]


BACKENDS = {b.name: b for b in (
    Backend("xla", exhaustive=True, batch=2, seq=29, blocks=(8, 8), decode_blocks=(4, 16),
            local=5, chunk=8, window=6, sinks=3, limit=9),
    # TPU interpret mode is slow: a covering design at a length that spans several tiles.
    Backend("pallas_tpu", exhaustive=False, batch=1, seq=72, blocks=(16, 32),
            decode_blocks=(8, 8), local=21, chunk=24, window=20, sinks=5, limit=30),
)}


def plan(exhaustive, crossed, rotated):
    """Tuples of axis values: the product of every axis when ``exhaustive``; else each
    combination of the ``crossed`` axes once, with each ``rotated`` axis cycling along them."""
    if exhaustive:
        return list(itertools.product(*crossed, *rotated))
    return [combo + tuple(axis[c % len(axis)] for axis in rotated)
            for c, combo in enumerate(itertools.product(*crossed))]


@dataclasses.dataclass(frozen=True)
class Case:
    """A ``backend.seq``-token self-attention case; ``segments``: packed documents (segment
    ids with per-document positions)."""

    mask: str
    norm: str
    heads: str
    dtype: str
    segments: bool = False

    @property
    def id(self):
        return "-".join((self.mask + ("+segments" if self.segments else ""), self.norm,
                         self.heads, self.dtype))

    def inputs(self, backend: Backend):
        """``(q, k, v, spec, attend keyword arguments)`` for ``backend``."""
        mask, limit = backend.mask(self.mask)
        spec = lcattn.AttentionSpec(mask, NORMS[self.norm], P.RoPE(), limit)
        b, t = backend.batch, backend.seq
        hq, hk = HEADS[self.heads]
        kw = {}
        if self.segments:
            seg, pos = packed_documents(b, t, 4, seed=3)
            kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, k_positions=pos)
        return (*qkv(0, b, t, t, hq, hk, 16, DTYPES[self.dtype]), spec, kw)


def matrix(backend: Backend):
    """Masks x normalizers x head layouts x dtypes, and packed documents. Exhaustive: the full
    product over MHA and GQA, plus ``SEGMENT_MASKS`` x normalizers with segments; covering:
    every mask (and causal with segments) x normalizer once, heads (MQA too) and dtypes
    rotating."""
    if backend.exhaustive:
        return ([Case(*c) for c in itertools.product(MASKS, NORMS, ("mha", "gqa"), DTYPES)]
                + [Case(m, n, "gqa", "f32", True)
                   for m, n in itertools.product(SEGMENT_MASKS, NORMS)])
    masks = [(m, False) for m in MASKS] + [("causal", True)]
    return [Case(m, n, h, d, seg)
            for (m, seg), n, h, d in plan(False, (masks, NORMS), (tuple(HEADS), tuple(DTYPES)))]


def options(backend: Backend):
    """``(normalizer option, position)`` names: normalizer settings and position encodings
    under a Λ-mask with a distance limit (covering: each option once, positions rotating)."""
    return plan(backend.exhaustive, (tuple(NORM_OPTIONS),), (tuple(POSITIONS),))


def options_inputs(norm, position):
    """48 tokens, GQA heads, ``Lambda(16, 3)`` with distance limit 12."""
    spec = lcattn.AttentionSpec(M.Lambda(16, 3), NORM_OPTIONS[norm], POSITIONS[position],
                                distance_limit=12)
    return (*qkv(1, 1, 48, 48, *HEADS["gqa"], 8), spec)


def decode(backend: Backend):
    """``(query rows, normalizer)``: a few queries at the end of a key cache (covering: each
    row count once, normalizers rotating)."""
    return plan(backend.exhaustive, (DECODE_ROWS,), (tuple(NORMS),))


def decode_inputs(backend: Backend, rows, norm):
    """``rows`` queries at positions ``DECODE_KEYS - rows ..`` (static, ``Tq != Tk``) under
    ``Lambda(8, 4)`` with distance limit 8; returns ``(q, k, v, spec, q_positions)``."""
    spec = lcattn.AttentionSpec(M.Lambda(8, 4), NORMS[norm], P.RoPE(), distance_limit=8)
    qpos = np.arange(DECODE_KEYS - rows, DECODE_KEYS, dtype=np.int32)
    return (*qkv(4, backend.batch, rows, DECODE_KEYS, 4, 1, 8), spec, qpos)
