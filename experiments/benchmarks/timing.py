"""Shared by the benchmark scripts: compile once, record memory, time repeats; progress lines;
the JSON report on stdout and in ``--out`` (with a PNG next to it).

``--profile_dir=DIR`` (a flag of every script that times with ``compile_and_time``:
``attention_cpu``, ``attention_gpu``, ``ssd_cpu``, ``ring``, ``sharding``) adds one untimed call
per measurement, traced with ``jax.profiler`` into ``DIR/<nnn>_<function>/`` (open with
``tensorboard --logdir DIR`` and its profile plugin, or ``perfetto_trace.json.gz`` in
ui.perfetto.dev); the timings are those of the untraced calls.
"""
from __future__ import annotations

import json
import pathlib
import re
import statistics
import sys
import time

import jax
import numpy as np
from absl import flags

_START = time.perf_counter()
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "Trace one extra, untimed call of each measurement with jax.profiler "
    "into DIR/<nnn>_<function>/ (TensorBoard profile plugin, Perfetto).")
_TRACES = [0]


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
    ``seconds`` (median), ``min_seconds`` and ``all_seconds`` (and ``profile``, the trace's
    folder, under ``--profile_dir``).
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
    if flags.FLAGS.is_parsed() and _PROFILE_DIR.value:
        name = re.sub(r"\W", "", getattr(fn, "__name__", "")) or "fn"
        path = pathlib.Path(_PROFILE_DIR.value) / f"{_TRACES[0]:03d}_{name}"
        _TRACES[0] += 1
        with jax.profiler.trace(str(path), create_perfetto_trace=True):
            jax.block_until_ready(compiled(*args))
        rec["profile"] = str(path)
        log(f"profiled into {path}")
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
