"""Shared by the benchmark scripts: compile once, record memory, time repeats; progress lines;
the JSON report on stdout and in ``--out`` (with a PNG next to it)."""
from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

_START = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr, stamped with seconds since the script started."""
    print(f"[{time.perf_counter() - _START:8.1f}s] {msg}", file=sys.stderr, flush=True)


def memory_fields(compiled) -> dict:
    """``*_in_bytes`` fields of ``compiled.memory_analysis()`` plus ``peak_bytes`` =
    temp + arguments + outputs (a static estimate of the peak); ``{}`` when unavailable."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    fields = {n: int(getattr(ma, n)) for n in dir(ma)
              if n.endswith("_in_bytes") and isinstance(getattr(ma, n), (int, np.integer))}
    fields["peak_bytes"] = (fields.get("temp_size_in_bytes", 0)
                            + fields.get("argument_size_in_bytes", 0)
                            + fields.get("output_size_in_bytes", 0))
    return fields


def compile_and_time(fn, args, repeats: int, warmup: int = 1):
    """Jit-compile ``fn(*args)``, run ``warmup`` untimed calls, then time ``repeats`` calls.

    Returns ``(record, last output)``; the record has ``compile_seconds``, the memory fields,
    ``seconds`` (median), ``min_seconds`` and ``all_seconds``.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    rec = {"compile_seconds": time.perf_counter() - t0, **memory_fields(compiled)}
    for _ in range(max(1, warmup)):
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    rec.update(seconds=statistics.median(times), min_seconds=min(times), all_seconds=times)
    return rec, out


def emit(report: dict, out: str | None, plot=None) -> None:
    """Print ``report`` as JSON; with ``out``, also write it there and ``plot(report, png)``
    to the same stem with a ``.png`` suffix."""
    text = json.dumps(report, indent=1)
    print(text)
    if not out:
        return
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    if plot is not None:
        plot(report, path.with_suffix(".png"))
    log(f"wrote {path}" + (f" and {path.with_suffix('.png')}" if plot is not None else ""))
