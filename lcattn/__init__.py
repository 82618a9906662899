"""lcattn: long-context sequence mixing in JAX.

``lcattn.attend(q, k, v, spec, ...)`` with ``spec = lcattn.AttentionSpec(mask, normalizer,
position, distance_limit)``; masks in ``lcattn.masks``, normalizers in ``lcattn.normalizers``,
position encodings in ``lcattn.positions``. Models: ``lcattn.model.DecoderLM`` and, around it,
HMT's hierarchical memory in ``lcattn.memory`` (import them explicitly).
"""
from lcattn import masks, normalizers, positions
from lcattn.attention import BACKENDS, AttentionSpec, attend

__all__ = ["attend", "AttentionSpec", "BACKENDS", "masks", "normalizers", "positions"]
__version__ = "0.1.0"
