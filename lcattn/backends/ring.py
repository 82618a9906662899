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
missed.

When the plan's hops are whole shards at shifts ``1 .. m`` (Causal, Full: ``m = n - 1``), the
hops run as a ``lax.scan`` of shift-by-one ``ppermute``s instead (the classic ring): one buffer
of keys in flight per device, the next shard's transfer issued before the current one is
attended (so they can overlap). Receivers the plan leaves out then get real keys of a later
shard, which the mask hides by position; a fully hidden shard costs no tile (the local
backend's tile lists are built from the received positions).

The gradient is a ring ``custom_vjp`` (``pass_fn``): the backward pass fetches each part's keys
again instead of keeping them, so the saved residuals per device are its own q, k, v, out and
lse (O(T/n)); in the scanned form dK / dV travel with their keys and one ``ppermute`` by
``-m`` carries them home at the end, so per-device memory stays O(T/n) whatever ``n``.
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


class _Transfers:
    """The plan's parts for device ``r``: ``fetch`` a part's keys, ``send_back`` their
    cotangents to where they came from (the transpose of the fetch, written out so the
    backward pass re-sends keys instead of keeping them)."""

    def __init__(self, plan, axis, n, like):
        self.plan, self.axis, self.n, self.like = plan, axis, n, like
        self.scan = scan_length(plan)
        hops = [] if self.scan else list(plan.hops)
        self.parts = ["own"] + hops + (["sinks"] if plan.broadcast else [])

    def rotate(self, keys, shift=1):
        """Every array of ``keys`` sent ``shift`` devices on (receiver ``r`` gets ``r - shift``)."""
        perm = [(t, (t + shift) % self.n) for t in range(self.n)]
        return jax.tree.map(lambda x: jax.lax.ppermute(x, self.axis, perm), keys)

    @property
    def r(self):  # traced where it is used (custom_vjp rules must not close over tracers)
        return jax.lax.axis_index(self.axis)

    def _perm(self, hop):
        return [((t - hop.shift) % self.n, t) for t in range(self.n) if hop.active[t]]

    def fetch(self, part, keys):
        """``(received keys, valid)``: valid is None (all usable) or a bool gate."""
        if part == "own":
            return keys, None
        if part == "sinks":
            bc, got = self.plan.broadcast, []
            for x in keys:  # one psum: each owner adds its slice, the others zeros
                if x is None:
                    got.append(None)
                    continue
                piece = x[:, bc.lo:bc.hi]
                mine = [jnp.where(self.r == o, piece, jnp.zeros_like(piece)) for o in bc.owners]
                total = jax.lax.psum(jnp.concatenate(mine, axis=1), self.axis)
                got.append(varying_like(total, self.like))  # per-device from here on
            return tuple(got), jnp.asarray(np.asarray(bc.valid, bool))[self.r][None, :]
        got = tuple(None if x is None else
                    jax.lax.ppermute(x[:, part.lo:part.hi], self.axis, self._perm(part))
                    for x in keys)  # inactive receivers get zeros (position 0!): gated
        return got, None if all(part.active) else jnp.asarray(part.active)[self.r]

    def send_back(self, part, ct, like):
        """Cotangent of this device's keys ``like [B, L, ...]`` from ``ct`` of a part."""
        if ct is None:
            return None
        if part == "own":
            return ct
        if part == "sinks":
            bc = self.plan.broadcast
            total, w = jax.lax.psum(ct, self.axis), bc.hi - bc.lo
            mine = sum(jnp.where(self.r == o, total[:, i * w:(i + 1) * w], 0.0)
                       for i, o in enumerate(bc.owners))
            lo, hi = bc.lo, bc.hi
        else:
            mine = jax.lax.ppermute(ct, self.axis, [(t, s) for s, t in self._perm(part)])
            lo, hi = part.lo, part.hi
        return jnp.zeros(like.shape, ct.dtype).at[:, lo:hi].set(mine)


def scan_length(plan) -> int:
    """``m`` when the plan's hops are whole shards at shifts ``1 .. m`` (``m >= 2``) and nothing
    is broadcast: they run as a scanned shift-by-one ring; else 0 (hops unrolled)."""
    hops = plan.hops
    whole = all(h.shift == i + 1 and (h.lo, h.hi) == (0, plan.local_len)
                for i, h in enumerate(hops))
    return len(hops) if whole and len(hops) >= 2 and plan.broadcast is None else 0


def _piece_grads(fn, q, kk, vv, ctx, out, lse, dout, dlse):
    """``(dq, dk, dv, dctx)`` of one part ``fn(q, kk, vv, ctx) -> (out_h, lse_h)`` through the
    merge: cotangents ``w dout`` and ``w (dout . (out_h - out) + dlse)``,
    ``w = exp(lse_h - lse)``."""
    (o_h, lse_h), vjp = jax.vjp(fn, q, kk, vv, ctx)
    live = jnp.isfinite(lse)
    w = jnp.where(live & jnp.isfinite(lse_h), jnp.exp(lse_h - jnp.where(live, lse, 0.0)), 0.0)
    d_lse, d_out = w * dlse, None
    if out is not None:
        d_lse = d_lse + w * jnp.sum(dout * (o_h - out), axis=-1)
        d_out = w[..., None] * dout
    return vjp((d_out, d_lse))


def pass_fn(local_pass, axis: str, layout: str = "contiguous"):
    """Wrap a backend's pass (``lcattn.backends.<name>.pass_fn(...)``) into a ring pass over
    the mesh axis ``axis``.

    Its gradient is a ``custom_vjp`` that does not keep what the hops received: the backward
    pass fetches each part again, recomputes its ``(out_h, lse_h)``, takes the local backend's
    VJP with the merge's cotangents ``w_h dout`` and ``w_h (dout . (out_h - out) + dlse)``
    (``w_h = exp(lse_h - lse)``, the merge every normalizer shares) and sends dK / dV home.
    """

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        n = jax.lax.axis_size(axis)
        plan = make_plan(mask, n, k.shape[1], layout, q_seg is not None)
        moves = _Transfers(plan, axis, n, q)
        slopes = None if bias is None else bias[2]
        ints = (jnp.asarray(q_pos), jnp.asarray(k_pos), q_seg, kv_seg,
                None if bias is None else jnp.asarray(bias[0]),
                None if bias is None else jnp.asarray(bias[1]))

        def local(q, kk, vv, ctx, ints, got, valid):
            q_pos, _, q_seg, _, q_bias, _ = ints
            _, _, kp, ks, ke = got
            b = None if slopes is None else (q_bias, ke, slopes)
            if valid is not None:
                q_seg = jnp.zeros_like(q_pos) if q_seg is None else q_seg
                ks = _gate(ks, kp, valid)
            return local_pass(q, kk, vv, ctx, q_pos, kp, q_seg, ks, b, mask=mask,
                              normalizer=normalizer, pass_idx=pass_idx)

        def part_fn(part, k, v, ints):
            got, valid = moves.fetch(part, (k, v, ints[1], ints[3], ints[5]))
            return got, (lambda q, kk, vv, ctx: local(q, kk, vv, ctx, ints, got, valid))

        def forward(q, k, v, ctx, ints):
            state = None
            for part in moves.parts:
                got, fn = part_fn(part, k, v, ints)
                piece = normalizer.from_result(*fn(q, got[0], got[1], ctx))
                state = piece if state is None else normalizer.merge(state, piece)
            if moves.scan:
                def visit(state, buf):
                    piece = local(q, buf[0], buf[1], ctx, ints, buf, None)
                    return normalizer.merge(state, normalizer.from_result(*piece))

                def step(carry, _):
                    state, buf = carry
                    return (visit(state, buf), moves.rotate(buf)), None  # next shard in flight

                keys = moves.rotate((k, v, ints[1], ints[3], ints[5]))
                (state, keys), _ = jax.lax.scan(step, (state, keys), length=moves.scan - 1)
                state = visit(state, keys)
            return normalizer.finalize(state)

        @jax.custom_vjp
        def ring(q, k, v, ctx, ints):
            return forward(q, k, v, ctx, ints)

        def ring_fwd(q, k, v, ctx, ints):
            out, lse = forward(q, k, v, ctx, ints)
            return (out, lse), (q, k, v, ctx, ints, out, lse)

        def ring_bwd(res, cts):
            q, k, v, ctx, ints, out, lse = res
            dout, dlse = cts
            f32 = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)  # noqa: E731
            dq, dk, dv = varying_like((f32(q), f32(k), f32(v)), q)
            dctx = varying_like(jax.tree.map(jnp.zeros_like, ctx), q)
            for part in moves.parts:
                got, fn = part_fn(part, k, v, ints)
                gq, gk, gv, gctx = _piece_grads(fn, q, got[0], got[1], ctx, out, lse, dout,
                                                dlse)
                dq = dq + gq
                dctx = jax.tree.map(jnp.add, dctx, gctx)
                dk = dk + moves.send_back(part, gk.astype(jnp.float32), k)
                if dv is not None:
                    dv = dv + moves.send_back(part, gv.astype(jnp.float32), v)
            if moves.scan:  # dK / dV travel with their keys, then go home in one hop
                def visit(acc, buf, dbuf):
                    dq, dctx = acc
                    fn = lambda q, kk, vv, ctx: local(q, kk, vv, ctx, ints, buf, None)  # noqa
                    gq, gk, gv, gctx = _piece_grads(fn, q, buf[0], buf[1], ctx, out, lse,
                                                    dout, dlse)
                    dbuf = (dbuf[0] + gk.astype(jnp.float32),
                            None if gv is None else dbuf[1] + gv.astype(jnp.float32))
                    return (dq + gq, jax.tree.map(jnp.add, dctx, gctx)), dbuf

                def step(carry, _):
                    acc, buf, dbuf = carry
                    acc, dbuf = visit(acc, buf, dbuf)
                    return (acc, moves.rotate(buf), moves.rotate(dbuf)), None

                keys = moves.rotate((k, v, ints[1], ints[3], ints[5]))
                (acc, keys, dbuf), _ = jax.lax.scan(
                    step, ((dq, dctx), keys, varying_like((f32(k), f32(v)), q)),
                    length=moves.scan - 1)
                (dq, dctx), dbuf = visit(acc, keys, dbuf)
                home_k, home_v = moves.rotate(dbuf, -moves.scan)
                dk = dk + home_k
                dv = None if dv is None else dv + home_v
            return (dq.astype(q.dtype), dk.astype(k.dtype),
                    None if v is None else dv.astype(v.dtype), dctx, None)

        ring.defvjp(ring_fwd, ring_bwd)
        return ring(q, k, v, ctx, ints)

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


def kv_shards_pass_fn(local_pass, axis: str):
    """Decoding against a cache sharded over ``axis``: the pass over this device's keys, then
    ``lse = log sum_r exp(lse_r)`` and ``out = sum_r exp(lse_r - lse) out_r`` across devices
    (one ``pmax`` and two ``psum``s of query-sized arrays; the merge every normalizer uses)."""

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        # q and its row context are the same on every device; typed per-device here, so
        # their gradient is the sum over devices (the transpose of this cast).
        q, ctx = varying_like((q, ctx), k)
        out, lse = local_pass(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, mask=mask,
                              normalizer=normalizer, pass_idx=pass_idx)
        top = jax.lax.pmax(jax.lax.stop_gradient(lse), axis)  # a stabilizer: no gradient
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        w = jnp.exp(lse - top)  # 0 where this device sees no key
        total = jax.lax.psum(w, axis)
        ok = total > 0
        lse_all = jnp.where(ok, top + jnp.log(jnp.where(ok, total, 1.0)), -jnp.inf)
        if out is None:
            return None, lse_all
        share = jnp.where(ok, w / jnp.where(ok, total, 1.0), 0.0)
        return jax.lax.psum(share[..., None] * out, axis), lse_all

    return run
