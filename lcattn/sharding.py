"""Device meshes and logical-axis sharding (pure functions; gin lives in ``experiments``).

A mesh has four axes, all ``AxisType.Auto`` (XLA's partitioner places the gathers and pads
lcattn's attention and scans need): ``data`` (batch), ``fsdp`` (batch, and parameters over
``embed``: fully-sharded data parallelism), ``tensor`` (heads, MLP width, vocabulary) and
``context`` (the sequence).

Layers name the axes of their parameters (``lcattn.layers.LOGICAL_AXES``) and lcattn's
activations use ``ACTIVATION_AXES``; a *rules* dict maps every one of those names to None, a
mesh axis, or a tuple of mesh axes. ``DEFAULT_RULES``::

    embed -> fsdp    heads, kv_heads, mlp, vocab -> tensor    head_dim, norm -> None
    batch -> (data, fsdp)    length -> context    act_embed -> None

A name missing from the rules is an error (flax would pass it through unchanged). Where a
mesh axis does not divide the dimension it would shard (2 kv heads on ``tensor=4``), that
array is not sharded over it; one log line per call lists them.

* ``make_mesh(data, fsdp, tensor, context, *, devices)`` -- the mesh;
* ``logical_rules(overrides)`` -- ``DEFAULT_RULES`` updated and checked;
* ``param_shardings(state, mesh, rules)`` / ``opt_state_shardings(tx, params, shardings,
  mesh)`` / ``batch_sharding(mesh)`` -- ``NamedSharding`` trees for ``jax.jit``;
* ``use_rules(rules)`` and ``constrain(x, names)`` -- activation constraints inside a
  ``jax.set_mesh`` context (no-ops without a mesh);
* ``context_parallel(fn, *args)`` -- ``fn`` inside ``shard_map`` over ``context``;
* ``context_split(x)`` / ``kv_shards(fn, replicated, split)`` -- a KV cache sharded over
  ``context`` along its slots, and ``fn`` inside ``shard_map`` on its parts (decoding);
* ``axis_size(name)`` -- the size of a mesh axis of the current (abstract) mesh, 1 if none;
* ``vma(x)`` / ``varying_like(tree, *refs)`` -- inside ``shard_map``: the manual axes a value
  varies over, and casting loop carries to match them.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable, Mapping

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger("lcattn.sharding")

MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")
ACTIVATION_AXES = ("batch", "length", "act_embed")
DEFAULT_RULES: dict = {
    "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "vocab": "tensor", "head_dim": None, "norm": None,
    "batch": BATCH_AXES, "length": "context", "act_embed": None,
}
_ACTIVE_RULES: list[dict] = []


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, context: int = 1, *,
              devices=None) -> Mesh:
    """A ``Mesh`` of shape ``(data, fsdp, tensor, context)`` over ``devices`` (default: all
    of ``jax.devices()``), every axis ``AxisType.Auto``.

    One size may be ``-1``: it takes the devices the others leave. The product must equal
    the number of devices.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "context": context}
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    bad = {k: v for k, v in sizes.items()
           if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1)}
    if bad or list(sizes.values()).count(-1) > 1:
        raise ValueError(f"make_mesh: sizes must be positive integers, at most one of them -1 "
                         f"(the remaining devices); got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if n % fixed:
            raise ValueError(f"make_mesh: {sizes} -- the fixed sizes (product {fixed}) do not "
                             f"divide the {n} devices")
        sizes = {k: (n // fixed if v == -1 else v) for k, v in sizes.items()}
    elif fixed != n:
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} x tensor={tensor} x "
                         f"context={context} = {fixed} devices, but there are {n} devices; "
                         "make the product match (or set one size to -1)")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def single_device_mesh(device=None) -> Mesh:
    """``make_mesh()`` on one device (default: the first)."""
    return make_mesh(devices=[device or jax.devices()[0]])


def logical_rules(overrides: Mapping | None = None) -> dict:
    """``DEFAULT_RULES`` updated with ``overrides`` (``name -> None | axis | (axes...)``).

    Every name must be a logical name (``LOGICAL_AXES + ACTIVATION_AXES``) and every value
    None, a mesh axis (``MESH_AXES``) or a tuple of them.
    """
    rules = dict(DEFAULT_RULES)
    for name, value in dict(overrides or {}).items():
        if name not in rules:
            raise ValueError(f"logical_rules: unknown logical axis {name!r}; allowed: "
                             f"{sorted(rules)}")
        axes = value if isinstance(value, (tuple, list)) else (value,)
        if any(a is not None and a not in MESH_AXES for a in axes):
            raise ValueError(f"logical_rules[{name!r}]: {value!r} is not None, a mesh axis or "
                             f"a tuple of mesh axes {MESH_AXES}")
        rules[name] = tuple(value) if isinstance(value, list) else value
    return rules


def _axes(rules: Mapping, name, where: str) -> tuple:
    """Mesh axes of logical ``name`` (None: unsharded) under ``rules``."""
    if name is None:
        return ()
    if name not in rules:
        raise ValueError(f"{where}: logical axis {name!r} has no sharding rule; the rules map "
                         f"{sorted(rules)} (add it with logical_rules(overrides=...))")
    value = rules[name]
    return () if value is None else (tuple(value) if isinstance(value, tuple) else (value,))


def spec_for(names: Iterable, shape: tuple, mesh_shape: Mapping, rules: Mapping,
             where: str = "array", dropped: list | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical axis ``names`` and ``shape``.

    A mesh axis that does not divide its dimension, or that an earlier dimension already
    uses, is left out (and recorded in ``dropped`` as ``(where, name, axis)``).
    """
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"{where}: {len(names)} logical names {names} for shape {shape}")
    used, spec = set(), []
    for name, dim in zip(names, shape):
        keep, size = [], 1
        for axis in _axes(rules, name, where):
            n = mesh_shape.get(axis, 1)
            if n == 1:
                continue
            if axis in used or dim % (size * n):
                if dropped is not None:
                    dropped.append((where, name, axis, n, dim))
                continue
            keep.append(axis)
            size *= n
            used.add(axis)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*spec)


def _log_dropped(dropped: list) -> None:
    if dropped:
        items = "; ".join(f"{where} ({name}={dim} over {axis}={n})"
                          for where, name, axis, n, dim in dropped)
        log.info("not sharded where the mesh axis does not divide the dimension: %s", items)


def param_shardings(model_state, mesh: Mesh, rules: Mapping | None = None) -> dict:
    """``NamedSharding`` per parameter, as the pure dict ``nnx.to_pure_dict`` gives.

    ``model_state``: an ``nnx.State`` of ``nnx.Param`` (``nnx.state(model, nnx.Param)``, or
    from ``nnx.eval_shape``) or a module; every variable must carry ``out_sharding`` names.
    """
    if isinstance(model_state, nnx.Module):
        model_state = nnx.state(model_state, nnx.Param)
    rules = DEFAULT_RULES if rules is None else rules
    flat, dropped = {}, []
    for path, var in nnx.to_flat_state(model_state):
        where = ".".join(str(p) for p in path)
        names = var.get_metadata().get("out_sharding")
        if names is None:
            raise ValueError(f"param_shardings: parameter {where} carries no logical axis "
                             "names (create it with lcattn.layers.params.param)")
        flat[path] = NamedSharding(mesh, spec_for(names, var.shape, mesh.shape, rules, where,
                                                  dropped))
    _log_dropped(dropped)
    out: dict = {}
    for path, sharding in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = sharding
    return out


def opt_state_shardings(tx: optax.GradientTransformation, params, shardings, mesh: Mesh):
    """Shardings of ``tx.init(params)``: each moment like its parameter, the rest
    (counts, scalars) replicated, masked-out entries (``optax.MaskedNode``) kept. ``params``
    may be arrays or ``ShapeDtypeStruct``s."""
    abstract = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    # masked transforms (optax.multi_transform: frozen parameters) hold MaskedNode there
    return optax.tree_map_params(tx, lambda p, s: p if isinstance(p, optax.MaskedNode) else s,
                                 abstract, shardings, transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, (NamedSharding,
                                                                  optax.MaskedNode)))


def batch_sharding(mesh: Mesh, rules: Mapping | None = None) -> NamedSharding:
    """Sharding of ``[batch, seq]`` arrays: batch over ``rules['batch']`` (``data``,
    ``fsdp``), sequence over ``rules['length']`` (``context``)."""
    rules = DEFAULT_RULES if rules is None else rules
    spec = []
    for name in ("batch", "length"):
        axes = tuple(a for a in _axes(rules, name, "batch_sharding") if mesh.shape[a] > 1)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(*spec))


def check_batch(batch_size: int, seq_len: int | None, mesh: Mesh,
                rules: Mapping | None = None, owner: str = "train") -> None:
    """Clear errors when the mesh's batch (sequence) axes do not divide the batch (length;
    not checked for None)."""
    spec = batch_sharding(mesh, rules).spec
    for what, dim, axes in (("batch_size", batch_size, spec[0]), ("seq_len", seq_len, spec[1])):
        if dim is None:
            continue
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n = math.prod(mesh.shape[a] for a in axes)
        if dim % n:
            raise ValueError(f"{owner}: `{what}` ({dim}) must be a multiple of the mesh axes "
                             f"{axes} it is sharded over (product {n}; mesh {dict(mesh.shape)})")


@contextlib.contextmanager
def use_rules(rules: Mapping):
    """Within this context, ``constrain`` maps logical names with ``rules``."""
    _ACTIVE_RULES.append(dict(rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.pop()


def _abstract_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def axis_size(name: str) -> int:
    """Size of mesh axis ``name`` in the current ``jax.set_mesh`` context (1 without one)."""
    mesh = _abstract_mesh()
    return 1 if mesh is None else dict(mesh.shape).get(name, 1)


def check_no_context(owner: str) -> None:
    """A clear error when the current mesh shards the sequence (``context > 1``): for layers
    that do not run context-parallel."""
    n = axis_size("context")
    if n > 1:
        raise ValueError(f"{owner}: the mesh shards the sequence over 'context' (size {n}), "
                         f"which {owner} does not support yet; use a mesh with context=1")


def vma(x) -> set:
    """The manual mesh axes ``x`` varies over (inside ``shard_map``; empty elsewhere)."""
    aval = jax.typeof(x)  # jax 0.10: manual_axis_type.varying; later releases: vma
    mat = getattr(aval, "manual_axis_type", None)
    return set(mat.varying if mat is not None else getattr(aval, "vma", ()) or ())


def varying_like(tree, *refs):
    """``tree`` typed as varying over the manual mesh axes of ``refs`` (inside ``shard_map``,
    loop carries must match the per-device values they are combined with); else unchanged."""
    axes = set().union(*(vma(r) for r in jax.tree.leaves(refs)))

    def cast(x):
        missing = tuple(sorted(axes - vma(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree) if axes else tree


def context_parallel(fn, *args):
    """``fn(*args)`` with every array of ``args`` (``[B, T, ...]``, or None) split over the
    mesh axis ``context`` along ``T`` inside ``jax.shard_map`` (only ``context`` manual; the
    other axes stay with XLA's partitioner); ``fn`` returns one ``[B, T, ...]`` array. Use
    inside a ``jax.set_mesh`` context (``axis_size("context") > 1``)."""
    present = [i for i, a in enumerate(args) if a is not None]

    def body(*xs):
        full = list(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    spec = PartitionSpec(None, "context")
    return jax.shard_map(body, in_specs=(spec,) * len(present), out_specs=spec,
                         axis_names=frozenset({"context"}))(*(args[i] for i in present))


def context_split(x: jax.Array) -> jax.Array:
    """``x [B, S, ...]`` (a KV cache array) constrained to ``S`` split over the mesh axis
    ``context`` and ``B`` over the active rules' ``batch`` axes (others replicated), eagerly
    or inside ``jit``; unchanged without a mesh with ``context > 1``. ``S`` must be a
    multiple of the context size (else ``S`` is not split, like any non-dividing axis)."""
    mesh = _abstract_mesh()
    if mesh is None or dict(mesh.shape).get("context", 1) == 1:
        return x
    rules = dict(_ACTIVE_RULES[-1] if _ACTIVE_RULES else DEFAULT_RULES, length="context")
    names = ("batch", "length") + (None,) * (x.ndim - 2)
    spec = spec_for(names, x.shape, dict(mesh.shape), rules, "kv cache")
    return jax.lax.with_sharding_constraint(x, spec)


def kv_shards(fn, replicated, split):
    """``fn(replicated, split) -> (out, new_split)`` inside ``jax.shard_map`` over ``context``
    (only ``context`` manual): every array of the pytree ``replicated`` is the same on each
    device of ``context`` (whole), every array of the pytree ``split`` (``[B, S, ...]``, e.g.
    a ``KVCache``) is split contiguously along ``S``; ``out`` must be the same on every
    device (e.g. merged with ``psum``) and comes back whole, ``new_split`` comes back split
    along dim 1. Use inside a ``jax.set_mesh`` context (``axis_size("context") > 1``)."""
    whole, part = PartitionSpec(), PartitionSpec(None, "context")
    return jax.shard_map(fn, in_specs=(whole, part), out_specs=(whole, part),
                         axis_names=frozenset({"context"}))(replicated, split)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to its logical ``names`` under the active rules
    (``use_rules``, default ``DEFAULT_RULES``); ``x`` unchanged without a mesh and outside
    ``jit`` (a constraint is a hint to the partitioner)."""
    mesh = _abstract_mesh()
    if mesh is None or mesh.size == 1 or not isinstance(x, jax.core.Tracer):
        return x
    rules = _ACTIVE_RULES[-1] if _ACTIVE_RULES else DEFAULT_RULES
    spec = spec_for(names, x.shape, dict(mesh.shape), rules, "activation")
    return jax.lax.with_sharding_constraint(x, spec)
