"""Output types of ``pallas_call`` inside ``jax.shard_map`` (ring attention's local pass)."""
from __future__ import annotations

import jax


def varying_struct(shape, dtype, arrays) -> jax.ShapeDtypeStruct:
    """A ``pallas_call`` output of ``shape`` / ``dtype`` typed like ``arrays`` inside
    ``jax.shard_map``: varying over the manual mesh axes they vary over (``check_vma`` needs
    it; a plain ``ShapeDtypeStruct`` elsewhere)."""
    axes = set()
    for x in (a for a in arrays if a is not None):
        aval = jax.typeof(x)  # jax 0.10: manual_axis_type.varying; later releases: vma
        mat = getattr(aval, "manual_axis_type", None)
        axes |= set(mat.varying if mat is not None else getattr(aval, "vma", ()) or ())
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    mat = getattr(jax.typeof(next(a for a in arrays if a is not None)), "manual_axis_type", None)
    if mat is not None:
        return jax.ShapeDtypeStruct(shape, dtype,
                                    manual_axis_type=mat.update(varying=frozenset(axes)))
    return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset(axes))
