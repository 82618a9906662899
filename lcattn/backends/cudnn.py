"""The ``cudnn`` backend: ``jax.nn.dot_product_attention(implementation="cudnn")`` for the
specs it can express, a baseline a GPU user would otherwise call.

cuDNN's fused attention computes ``softmax(scale * q k^T) v`` with an index-based causal mask
and an optional sliding window ``local_window_size = (left, right)`` (key ``j`` visible from
query ``i`` iff ``i - left <= j <= i + right``). So it runs:

* normalizer ``Softmax(softcap=None)`` (any ``scale``);
* masks ``Full()``, ``Causal()``, ``Local(w)`` (``is_causal`` with ``local_window_size =
  (w - 1, 0)``);
* position encodings that rotate q and k (``RoPE`` with any scaling, ``NoPE``): ``attend``
  applies them here, before the call;
* GQA (cuDNN takes fewer kv heads natively), bfloat16 / float16 inputs;
* self-attention with default positions (``q`` and ``k`` of one length, no positions given):
  the mask is on indices, so positions cannot move it.

Anything else (LSSA / LSSAR, soft-capping, Λ / Chunked / Sinks masks, a distance limit,
ALiBi, segment ids, explicit positions, float32) is a ``ValueError`` naming what is not
supported. Off GPU ``jax.nn.dot_product_attention`` refuses ``implementation="cudnn"``;
``IMPLEMENTATION`` exists so the tests can check this module's translation with jax's XLA
implementation of the same call.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcattn import masks as masks_lib
from lcattn import normalizers as norms_lib
from lcattn import positions as pos_lib

IMPLEMENTATION = "cudnn"
DTYPES = (jnp.bfloat16, jnp.float16)


def _unsupported(what: str):
    return ValueError(f"backend='cudnn' cannot express {what}; use backend='xla' (or "
                      f"'pallas_tpu' / 'reference')")


def check(spec, q, inp) -> dict:
    """The keyword arguments of ``jax.nn.dot_product_attention`` for ``spec``, or a clear
    ``ValueError`` naming what cuDNN cannot do."""
    norm, mask = spec.normalizer, spec.mask
    if not isinstance(norm, norms_lib.Softmax):
        raise _unsupported(f"normalizer {norm!r} (only Softmax)")
    if norm.softcap is not None:
        raise _unsupported(f"Softmax(softcap={norm.softcap}) (no soft-capping)")
    if spec.distance_limit is not None:
        raise _unsupported(f"distance_limit={spec.distance_limit}")
    if isinstance(spec.position, pos_lib.ALiBi):
        raise _unsupported("ALiBi (a per-head bias)")
    if inp.q_seg is not None:
        raise _unsupported("segment ids (packed documents)")
    if not inp.default_k_pos or q.shape[1] != inp.k_pos.shape[1]:
        raise _unsupported("explicit positions or q and k of different lengths (its masks "
                           "are on indices: self-attention with default positions only)")
    if jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in DTYPES]:
        raise _unsupported(f"dtype {jnp.dtype(q.dtype).name} (bfloat16 or float16 only)")
    scale = norm.scale if norm.scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if isinstance(mask, masks_lib.Full):
        return dict(scale=scale)
    if isinstance(mask, masks_lib.Causal):
        return dict(scale=scale, is_causal=True)
    if isinstance(mask, masks_lib.Local):
        return dict(scale=scale, is_causal=True, local_window_size=(mask.window - 1, 0))
    raise _unsupported(f"mask {mask!r} (Full, Causal and Local only)")


def attend(q, k, v, spec, inp):
    """``[B, Tq, Hq, Dv]`` through cuDNN; see ``lcattn.attend`` for the contract."""
    kwargs = check(spec, q, inp)
    length = pos_lib.rotation_length(inp.q_pos)  # the queries' own, for both rotations
    qe = spec.position.rotate(q, inp.q_pos, length).astype(q.dtype)
    ke = spec.position.rotate(k, inp.k_pos, length).astype(k.dtype)
    return jax.nn.dot_product_attention(qe, ke, v.astype(q.dtype),
                                        implementation=IMPLEMENTATION, **kwargs)
