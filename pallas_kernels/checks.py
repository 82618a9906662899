"""Argument checks shared by the kernels' entry points and ``BlockSizes`` (and by lcattn).

Each raises ``ValueError("<owner>: `<name>` must be ..., got <value>")``: the message names the
object or function that took the argument and the argument itself. Integers may be Python or
numpy integers (never ``bool``). ``pallas_kernels`` may not import lcattn, so the integer
checks live here and ``lcattn.checks`` re-exports them with its other checks.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """A Python or numpy integer, not a ``bool``."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def integer(owner: str, name: str, value: Any, *, minimum: int = 1, maximum: int | None = None,
            allow_none: bool = False) -> None:
    """``value`` is an integer in ``[minimum, maximum]`` (or None when ``allow_none``)."""
    if allow_none and value is None:
        return
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        allowed = f"None or an integer {allowed}" if allow_none else f"an integer {allowed}"
        raise ValueError(f"{owner}: `{name}` must be {allowed}, got {value!r}")
