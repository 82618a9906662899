"""CPU benchmark: Mamba-2 SSD, the chunked algorithm vs the sequential ``lax.scan``.

Run (from the repository root)::

    PYTHONPATH=. python -m experiments.benchmarks.ssd_cpu --out=/tmp/ssd_cpu.json
    PYTHONPATH=. python -m experiments.benchmarks.ssd_cpu --seq_lens=4096 --state_dim=128

For every sequence length T, mode (``forward``; ``forward_backward`` = jitted
``value_and_grad`` of ``sum(y**2)`` w.r.t. ``x, dt, A, B, C``) and implementation
(``chunked``: ``lcattn.ssm.ssd_chunked(..., chunk_size=--chunk_size,
block_size=--block_size)``; ``sequential``: ``lcattn.ssm.ssd_sequential``, one token per scan
step) it compiles once, records the compiled executable's ``memory_analysis()``
(``peak_bytes`` = temp + argument + output bytes), then reports the median wall time of
``--repeats`` calls after ``--warmup`` untimed ones (the first calls of a program that needs
tens of MB of temporaries also pay the allocator's page faults until glibc's heap settles).
Shapes: batch ``--batch``,
``--heads`` heads of width ``--head_dim``, ``--groups`` groups of ``B``/``C`` of width
``--state_dim``, float32, no documents, no mitigations; ``Δ = softplus(N(0,1) - 3)`` and
``A = -exp(U[0, log 16])`` (decays in the range Mamba-2 initializes). Prints one JSON object on
stdout (progress goes to stderr); ``--out`` also writes it to a file.
"""
from __future__ import annotations

import math
import platform

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.timing import compile_and_time, emit, log
from lcattn import ssm

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "4096", "16384"], "Sequence lengths.")
_MODES = flags.DEFINE_list("modes", ["forward", "forward_backward"], "Modes to time.")
_IMPLS = flags.DEFINE_list("impls", ["chunked", "sequential"],
                           "chunked, sequential, pallas (the chunk-scan kernel: meaningful on a "
                           "GPU only; elsewhere it times the Pallas interpreter).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "SSM heads H.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head width P.")
_STATE_DIM = flags.DEFINE_integer("state_dim", 64, "State width N.")
_GROUPS = flags.DEFINE_integer("groups", 1, "Groups G of B and C.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk size Q of the chunked algorithm.")
_BLOCK = flags.DEFINE_integer("block_size", 512, "Tokens per block of the chunked scan.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls before the timed ones.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")

GIB = 2.0 ** 30


def make_inputs(seq_len):
    b, t, h, p, g, n = (_BATCH.value, seq_len, _HEADS.value, _HEAD_DIM.value, _GROUPS.value,
                        _STATE_DIM.value)
    k = jax.random.split(jax.random.key(0), 5)
    return (jax.random.normal(k[0], (b, t, h, p)),
            jax.nn.softplus(jax.random.normal(k[1], (b, t, h)) - 3.0),
            -jnp.exp(jax.random.uniform(k[2], (h,), maxval=math.log(16.0))),
            jax.random.normal(k[3], (b, t, g, n)), jax.random.normal(k[4], (b, t, g, n)))


def ssd_fn(impl):
    if impl == "chunked":
        return lambda *a: ssm.ssd_chunked(*a, chunk_size=_CHUNK.value,
                                          block_size=_BLOCK.value)[0]
    if impl == "sequential":
        return lambda *a: ssm.ssd_sequential(*a)[0]
    if impl == "pallas":
        return lambda *a: ssm.ssd_pallas(*a, chunk_size=_CHUNK.value)[0]
    raise app.UsageError(f"unknown impl {impl!r}")


def measure(impl, mode, args):
    fn = ssd_fn(impl)
    if mode == "forward_backward":
        fn = jax.value_and_grad(lambda *a: jnp.sum(ssd_fn(impl)(*a) ** 2),
                                argnums=tuple(range(5)))
    elif mode != "forward":
        raise app.UsageError(f"unknown mode {mode!r}")
    rec, out = compile_and_time(fn, args, _REPEATS.value, _WARMUP.value)
    return rec, (out if mode == "forward" else None)


def run_all():
    results = []
    for seq_len in (int(t) for t in _SEQ_LENS.value):
        args = make_inputs(seq_len)
        for mode in _MODES.value:
            outs, recs = {}, {}
            for impl in _IMPLS.value:
                rec, outs[impl] = measure(impl, mode, args)
                recs[impl] = {"T": seq_len, "mode": mode, "impl": impl, **rec}
                results.append(recs[impl])
                log(f"T={seq_len} {mode} {impl}: {rec['seconds']:.4f}s, "
                    f"peak {rec.get('peak_bytes', 0) / GIB:.3f} GiB")
            if outs.get("chunked") is not None and outs.get("sequential") is not None:
                diff = float(jnp.max(jnp.abs(outs["chunked"] - outs["sequential"])))
                recs["chunked"]["max_abs_diff_vs_sequential"] = diff
    return results


def speedups(results):
    by_key = {(r["T"], r["mode"], r["impl"]): r for r in results}
    return [{"T": t, "mode": mode,
             "speedup": by_key[(t, mode, "sequential")]["seconds"] / rec["seconds"]}
            for (t, mode, impl), rec in by_key.items()
            if impl == "chunked" and (t, mode, "sequential") in by_key]


def plot(report, path):
    """Median time and peak memory against T, chunked vs sequential, per mode (log-log)."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("forward", "--"), ("forward_backward", "-")):
        for impl, color in (("chunked", "tab:blue"), ("sequential", "tab:red")):
            rows = sorted((r for r in report["results"] if r["mode"] == mode
                           and r["impl"] == impl), key=lambda r: r["T"])
            if not rows:
                continue
            ts = [r["T"] for r in rows]
            kw = dict(color=color, linestyle=style, marker="o", label=f"{impl} {mode}")
            axes[0].plot(ts, [r["seconds"] for r in rows], **kw)
            axes[1].plot(ts, [r["peak_bytes"] / GIB for r in rows], **kw)
    for ax, title, unit in ((axes[0], "median time", "seconds"),
                            (axes[1], "peak memory (memory_analysis)", "GiB")):
        ax.set(title=title, ylabel=unit, xlabel="sequence length T", xscale="log",
               yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"Mamba-2 SSD on CPU: H={cfg['heads']}, P={cfg['head_dim']}, "
                 f"N={cfg['state_dim']}, chunk {cfg['chunk_size']}, block {cfg['block_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    config = {"batch": _BATCH.value, "heads": _HEADS.value, "head_dim": _HEAD_DIM.value,
              "state_dim": _STATE_DIM.value, "groups": _GROUPS.value,
              "chunk_size": _CHUNK.value, "block_size": _BLOCK.value,
              "repeats": _REPEATS.value, "warmup": _WARMUP.value, "dtype": "float32"}
    log(f"config {config}")
    results = run_all()
    report = {"config": config, "results": results, "speedups": speedups(results),
              "machine": {"jax": jax.__version__, "python": platform.python_version(),
                          "platform": platform.platform(), "devices": str(jax.devices())}}
    emit(report, _OUT.value, plot)


if __name__ == "__main__":
    app.run(main)
