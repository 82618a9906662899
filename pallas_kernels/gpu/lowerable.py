"""The VJP of a normalizer's ``log_weight`` with ops Mosaic GPU lowers.

``jax.vjp(log_weight)`` emits ``add_any`` (how autodiff sums cotangents), ``integer_pow`` with
``y < -1`` and nested ``jit`` calls, which Mosaic GPU does not lower; ``evaluate`` re-runs the
jaxpr with them rewritten (``add``, multiplies, inlined calls). Other higher-order primitives
in a future normalizer's VJP would still fail to lower.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core


def evaluate(jaxpr, consts, *args):
    """Evaluate ``jaxpr`` with the ops Mosaic GPU lowers: ``add_any`` (how autodiff sums
    cotangents) as ``add``, ``integer_pow`` as multiplies (its rule takes no ``y < -1``),
    calls inlined."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins, name = [read(v) for v in eqn.invars], eqn.primitive.name
        if name == "add_any":
            outs = [lax.add(*ins)]
        elif name == "integer_pow":
            y, x = eqn.params["y"], ins[0]
            power = jnp.ones_like(x) if y == 0 else x
            for _ in range(abs(y) - 1):
                power = power * x
            outs = [1.0 / power if y < 0 else power]
        elif name in ("jit", "pjit", "closed_call"):
            call = eqn.params["jaxpr"]
            outs = evaluate(call.jaxpr, call.consts, *ins)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def log_weight_vjp(normalizer, pass_idx: int, s, ctx: dict, ct):
    """``(ct * dt/ds, {name: ct * dt/dctx})`` of the elementwise ``t = normalizer.log_weight(s,
    ctx, pass_idx)``, traced by ``jax.vjp`` and evaluated with lowerable ops (``evaluate``)."""

    def grad(s_, c_, ct_):
        return jax.vjp(lambda a, b: normalizer.log_weight(a, b, pass_idx), s_, c_)[1](ct_)

    closed = jax.make_jaxpr(grad)(s, ctx, ct)
    flat = evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves((s, ctx, ct)))
    return jax.tree.unflatten(jax.tree.structure((s, ctx)), flat)
