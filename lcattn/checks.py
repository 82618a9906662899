"""Argument checks shared by lcattn's dataclasses, layers and functions.

Each raises ``ValueError("<owner>: `<name>` must be ..., got <value>")``: the message names the
object or function that took the argument and the argument itself. Integers may be Python or
numpy integers (never ``bool``); numbers may also be Python or numpy floats. The integer checks
are ``pallas_kernels.checks``'s (the kernels may not import lcattn; lcattn may import them).
"""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from pallas_kernels.checks import integer, is_int

__all__ = ["choice", "integer", "integers", "is_int", "positive", "tokens"]


def positive(owner: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` is a finite number > 0 (or None when ``allow_none``)."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        allowed = "None or a finite number > 0" if allow_none else "a finite number > 0"
        raise ValueError(f"{owner}: `{name}` must be {allowed}, got {value!r}")


def integers(owner: str, name: str, values: Any, *, minimum: int = 1) -> None:
    """``values`` is a sequence of integers, each ``>= minimum``."""
    if isinstance(values, str) or not all(is_int(v) and v >= minimum for v in values):
        raise ValueError(f"{owner}: `{name}` must be integers >= {minimum}, got {values!r}")


def choice(owner: str, name: str, value: Any, allowed) -> None:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{owner}: `{name}` must be one of {tuple(allowed)}, got {value!r}")


def tokens(value: Any, name: str = "tokens") -> None:
    """``value`` is an integer array ``[batch, seq]``."""
    arr = jnp.asarray(value)
    if arr.ndim != 2 or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"`{name}` must be an integer array [batch, seq], got shape "
                         f"{arr.shape} dtype {arr.dtype}")
