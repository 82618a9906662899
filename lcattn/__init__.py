"""lcattn: long-context sequence mixing in JAX.

``lcattn.attend(q, k, v, spec, ...)`` with ``spec = lcattn.AttentionSpec(mask, normalizer,
position, distance_limit)``; masks in ``lcattn.masks``, normalizers in ``lcattn.normalizers``,
position encodings in ``lcattn.positions``, backends in ``lcattn.backends``. Models:
``lcattn.model.DecoderLM`` and, around it, HMT's hierarchical memory in ``lcattn.memory``;
Hugging Face-format checkpoints in and out with ``lcattn.pretrained`` (import them explicitly).
"""
from lcattn import backends, masks, normalizers, positions
from lcattn.attention import AttentionSpec, attend

BACKENDS = backends.names()  # "auto" and the registered backends (lcattn.backends.REGISTRY)

__all__ = ["attend", "AttentionSpec", "BACKENDS", "backends", "masks", "normalizers",
           "positions"]
__version__ = "0.1.0"
