"""Ring attention: a ``streaming_attend`` pass over a sequence sharded on a mesh axis.

Runs inside ``jax.shard_map`` (``lcattn.attend(..., context_axis="context")``): each device
holds ``L`` slots of q, k, v, positions and segment ids (layout in
``lcattn.backends.ring_plan``). One pass is

1. the local backend's pass over the device's own keys;
2. per hop of the plan, one ``ppermute`` of the slice of keys (with their values, positions,
   segment ids and ALiBi positions) the mask lets receivers see, sent only to the receivers
   that need it, and the local pass over it;
3. with a broadcast, one ``psum`` (all-reduce) that carries the owners' sink slices to every
   device (the other devices add zeros, so the sum is exact and its size does not grow with
   the number of devices), and the local pass over them;

the partial ``(out, lse)`` merged with the normalizer's ``from_result`` / ``merge`` /
``finalize``. Keys a receiver must not use (the zeros ``ppermute`` hands a receiver it sends
nothing to: a zero key at position 0 is visible under Causal; a sink key it already has) get
the segment id ``INVALID`` (a query's segment never matches it), so every local backend gates
them exactly as it gates other documents. Segment ids must be distinct per document (packing
numbers them 1, 2, ...): the plan routes keys by index, so a reused id far away would be
missed. Gradients flow through the hops by
autodiff (``ppermute`` and ``psum`` transpose to the reverse transfers); each hop's
received keys are kept for the backward pass, so memory per device is O(keys received): O(T/n)
plus the halo for Local / Λ, O(T) for Causal and Full (a ring ``custom_vjp`` that re-sends them
is not built yet).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcattn.backends.ring_plan import global_positions, make_plan
from lcattn.sharding import varying_like

INVALID = np.iinfo(np.int32).min


def layout_positions(axis: str, layout: str, local_len: int) -> jax.Array:
    """``int32 [local_len]``: this device's global token indices (call inside ``shard_map``)."""
    n = jax.lax.axis_size(axis)
    table = jnp.asarray(global_positions(layout, n, local_len), jnp.int32)
    return table[jax.lax.axis_index(axis)]


def _gate(seg, kp, valid):
    """Segment ids of received keys with the invalid ones set to ``INVALID``."""
    seg = jnp.zeros_like(kp) if seg is None else seg
    return jnp.where(valid, seg, INVALID)


def pass_fn(local_pass, axis: str, layout: str = "contiguous"):
    """Wrap a backend's pass (``lcattn.backends.<name>.pass_fn(...)``) into a ring pass over
    the mesh axis ``axis``."""

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        n = jax.lax.axis_size(axis)
        r = jax.lax.axis_index(axis)
        plan = make_plan(mask, n, k.shape[1], layout, q_seg is not None)
        q_seg_g = jnp.zeros_like(jnp.asarray(q_pos)) if q_seg is None else q_seg

        def local(kk, vv, kp, ks, ke, valid=None):
            b = None if bias is None else (bias[0], ke, bias[2])
            if valid is None:
                return local_pass(q, kk, vv, ctx, q_pos, kp, q_seg, ks, b, mask=mask,
                                  normalizer=normalizer, pass_idx=pass_idx)
            return local_pass(q, kk, vv, ctx, q_pos, kp, q_seg_g, _gate(ks, kp, valid), b,
                              mask=mask, normalizer=normalizer, pass_idx=pass_idx)

        ke = None if bias is None else jnp.asarray(bias[1])
        k_pos = jnp.asarray(k_pos)
        keys = (k, v, k_pos, kv_seg, ke)
        parts = [local(*keys)]
        for hop in plan.hops:
            perm = [((t - hop.shift) % n, t) for t in range(n) if hop.active[t]]
            got = [None if x is None else jax.lax.ppermute(x[:, hop.lo:hop.hi], axis, perm)
                   for x in keys]  # inactive receivers get zeros (position 0!): gated
            gate = None if all(hop.active) else jnp.asarray(hop.active)[r]
            parts.append(local(*got, valid=gate))
        if plan.broadcast is not None:  # one psum: each owner adds its slice, others zeros
            bc, got = plan.broadcast, []
            for x in keys:
                if x is None:
                    got.append(None)
                    continue
                part = x[:, bc.lo:bc.hi]
                mine = [jnp.where(r == o, part, jnp.zeros_like(part)) for o in bc.owners]
                total = jax.lax.psum(jnp.concatenate(mine, axis=1), axis)
                got.append(varying_like(total, q))  # per-device from here on
            valid = jnp.asarray(np.asarray(bc.valid, bool))[r][None, :]
            parts.append(local(*got, valid=valid))
        state = None
        for out, lse in parts:
            part = normalizer.from_result(out, lse)
            state = part if state is None else normalizer.merge(state, part)
        return normalizer.finalize(state)

    return run


def gather_pass_fn(local_pass, axis: str):
    """The all-gather form, for comparison: every device gathers all keys (with values,
    positions, segment ids, ALiBi positions) over ``axis`` and runs one local pass; memory
    O(T) per device, ``n - 1`` shards received whatever the mask."""

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        def gather(x):
            return None if x is None else jax.lax.all_gather(x, axis, axis=1, tiled=True)

        kk, vv, kp, ks = (gather(x) for x in (k, v, jnp.asarray(k_pos), kv_seg))
        b = None if bias is None else (bias[0], gather(jnp.asarray(bias[1])), bias[2])
        return local_pass(q, kk, vv, ctx, q_pos, kp, q_seg, ks, b, mask=mask,
                          normalizer=normalizer, pass_idx=pass_idx)

    return run
