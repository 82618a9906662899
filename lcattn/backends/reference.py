"""The dense reference backend: the oracle every other backend is tested against.

It builds the full ``[B, H, Tq, Tk]`` score matrix and applies each normalizer's
``dense_weights`` (the paper's equations as written), so it shares no tiling, streaming or
branch-merging code with the blockwise backends. LM-Infinite's distance limit is applied
literally: one score matrix whose sink entries beyond the window are replaced by the score of
the query rotated at ``D`` against the unrotated key.
"""
from __future__ import annotations

import jax.numpy as jnp

from lcattn import masks as masks_lib
from lcattn import positions as pos_lib


def _scores(q, k, spec, q_pos, k_pos, log_count, length):
    """``[B, H, Tq, Tk]`` float32 scores of prepared q/k at encoding positions, plus ALiBi;
    ``length``: the call's ``rotation_length`` (of the true query positions)."""
    qe = spec.position.rotate(q, q_pos, length)
    ke = spec.position.rotate(k, k_pos, length)
    qe, ke = spec.normalizer.prepare(qe, ke, log_count)
    s = jnp.einsum("bqhd,bkhd->bhqk", qe, ke, preferred_element_type=jnp.float32)
    slopes = spec.position.slopes(q.shape[2])
    if slopes is not None:
        s = s + pos_lib.alibi_bias(q_pos[:, None, :, None], k_pos[:, None, None, :],
                                   slopes[None, :, None, None])
    return s


def attend(q, k, v, spec, inp):
    """Dense attention; see ``lcattn.attend`` for the contract. Returns ``[B, Tq, Hq, Dv]``."""
    hq, hk, dtype = q.shape[2], k.shape[2], q.dtype
    k = jnp.repeat(k.astype(jnp.float32), hq // hk, axis=2)
    v = jnp.repeat(v.astype(jnp.float32), hq // hk, axis=2)
    q = q.astype(jnp.float32)
    qp, kp = jnp.asarray(inp.q_pos), jnp.asarray(inp.k_pos)
    visible = spec.mask(qp[:, :, None], kp[:, None, :])
    if inp.q_seg is not None:
        visible = visible & (inp.q_seg[:, :, None] == inp.kv_seg[:, None, :])
    count = jnp.sum(visible, axis=-1).astype(jnp.float32)  # [B, Tq]
    log_count = jnp.log(jnp.maximum(count, 1.0))[..., None]
    length = pos_lib.rotation_length(inp.q_pos)  # the queries' own, for every rotation
    s = _scores(q, k, spec, qp, kp, log_count, length)
    if spec.distance_limit is not None:
        far = visible & masks_lib.Beyond(spec.mask.window)(qp[:, :, None], kp[:, None, :])
        s_far = _scores(q, k, spec, jnp.full_like(qp, spec.distance_limit), jnp.zeros_like(kp),
                        log_count, length)
        s = jnp.where(far[:, None], s_far, s)
    ctx = {"count": count[:, None, :, None], "q_pos": qp[:, None, :, None].astype(jnp.float32)}
    p = spec.normalizer.dense_weights(s, visible[:, None], ctx)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=jnp.float32)
    return out.astype(dtype)
