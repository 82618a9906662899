"""The ``custom_vjp`` pass shared by the GPU kernel backends (``pallas_gpu``,
``pallas_triton``): ``streaming_attend``'s ``[B, T, H, D]`` pass contract around a forward
kernel and its backward kernels over ``[B, H, T, D]``."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lcattn.positions import alibi_bias
from lcattn.sharding import varying_like
from pallas_kernels.protocols import Bias


def heads_first(x):
    """``[B, T, H, ...]`` <-> ``[B, H, T, ...]`` (None passes through)."""
    return None if x is None else jnp.swapaxes(x, 1, 2)


def cast_to(dtype) -> Callable:
    """``[B, T, H, D]`` -> heads first in ``dtype`` (None passes through)."""
    return lambda x: None if x is None else heads_first(x).astype(dtype)


def kernel_args(q_pos, k_pos, q_seg, kv_seg, bias, **kw) -> dict:
    """The kernels' keyword arguments from a pass's position / segment / ALiBi inputs (the
    bias as a ``protocols.Bias`` of ``lcattn.positions.alibi_bias``) and ``kw``."""
    return dict(q_positions=q_pos, k_positions=k_pos, q_segment_ids=q_seg,
                kv_segment_ids=kv_seg, bias=None if bias is None else Bias(alibi_bias, *bias),
                **kw)


def kernel_pass(forward: Callable, backward: Callable, qk: Callable, cast: Callable,
                where: dict) -> Callable:
    """``(q, k, v, ctx) -> (out, lse)`` through ``forward(q, k, v, ctx, **where) -> (out,
    lse)`` with ``backward(q, k, v, ctx, out, lse, dout, dlse, **where) -> (dq, dk, dv,
    dctx)`` as its VJP (the kernels recompute from the saved ``lse``). ``qk`` / ``cast``: how
    q, k and v reach the kernels (heads first, in the kernels' operand dtypes). Outputs and
    gradients are typed as varying like their inputs inside ``shard_map`` (ring attention)."""

    def ctx_first(ctx):
        return {n: heads_first(c) for n, c in ctx.items()}

    def kernel(q, k, v, ctx):
        out, lse = forward(qk(q), qk(k), cast(v), ctx_first(ctx), **where)
        return varying_like((heads_first(out), heads_first(lse)), q, k, v, ctx)

    @jax.custom_vjp
    def attend_pass(q, k, v, ctx):
        return kernel(q, k, v, ctx)

    def fwd(q, k, v, ctx):
        out, lse = kernel(q, k, v, ctx)
        return (out, lse), (q, k, v, ctx, out, lse)

    def bwd(res, cts):
        q, k, v, ctx, out, lse = res
        dout, dlse = cts
        dq, dk, dv, dctx = backward(qk(q), qk(k), cast(v), ctx_first(ctx), heads_first(out),
                                    heads_first(lse), heads_first(dout), heads_first(dlse),
                                    **where)
        dctx = {n: jnp.zeros_like(c) if dctx is None else heads_first(dctx[n])
                for n, c in ctx.items()}
        grads = (heads_first(dq).astype(q.dtype), heads_first(dk).astype(k.dtype),
                 None if v is None else heads_first(dv).astype(v.dtype), dctx)
        return tuple(jax.tree.map(varying_like, g, x) for g, x in zip(grads, (q, k, v, ctx)))

    attend_pass.defvjp(fwd, bwd)
    return attend_pass
