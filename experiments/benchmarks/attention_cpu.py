"""CPU benchmark: lcattn's blockwise ``xla`` backend vs dense ``jax.nn.dot_product_attention``.

Run (from the repository root)::

    PYTHONPATH=. python -m experiments.benchmarks.attention_cpu --out=/tmp/bench.json
    PYTHONPATH=. python -m experiments.benchmarks.attention_cpu --seq_lens=1024,2048 \
        --out=/tmp/bench_small.json

For every sequence length T, mask (``Causal()``, ``Lambda(512, 16)``), mode (``forward``;
``forward_backward`` = jitted ``value_and_grad`` of ``sum(out**2)`` w.r.t. q, k, v) and
implementation (``xla``: ``lcattn.attend(..., backend="xla")``; ``dense``: what a user would
write otherwise, ``jax.nn.dot_product_attention`` with ``is_causal=True`` or a boolean
``[1, 1, T, T]`` mask built with numpy and passed as an argument) it compiles once, records the
compiled executable's ``memory_analysis()`` (``peak_bytes`` = temp + argument + output bytes, an
estimate of the peak), then reports the median wall time of ``--repeats`` calls after one warmup.
Dense runs whose estimated memory (``T*T*heads*4`` bytes times a factor) exceeds
``--dense_memory_gib`` are skipped, not attempted. Shapes: batch 1, ``--heads`` heads, head_dim
``--head_dim``, float32, NoPE, softmax. Prints one JSON object on stdout (progress goes to
stderr); ``--out`` also writes it to a file and a 2x2 PNG plot (same stem) next to it.
"""
from __future__ import annotations

import gc
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import lcattn
from experiments.benchmarks.timing import compile_and_time, emit, log

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "Sequence lengths.")
_MASKS = flags.DEFINE_list("masks", ["causal", "lambda"], "Masks: causal, lambda.")
_MODES = flags.DEFINE_list("modes", ["forward", "forward_backward"], "Modes to time.")
_IMPLS = flags.DEFINE_list("impls", ["xla", "dense"], "Implementations: xla, dense.")
_HEADS = flags.DEFINE_integer("heads", 4, "Number of heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_BLOCKS = flags.DEFINE_list("block_sizes", ["512", "512"], "block_q,block_k for the xla backend.")
_WINDOW = flags.DEFINE_integer("window", 512, "Lambda mask window.")
_N_GLOBAL = flags.DEFINE_integer("n_global", 16, "Lambda mask sink (global) tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")
_DENSE_GIB = flags.DEFINE_float("dense_memory_gib", 12.0,
                                "Skip dense runs whose estimated memory exceeds this (GiB).")
_DENSE_FACTOR = flags.DEFINE_float(
    "dense_factor", 3.0, "Dense estimate: live [T, T, heads] float32 arrays in forward mode; "
    "forward_backward uses 2x this.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON here, and a PNG plot with the same stem.")

GIB = 2.0 ** 30


def make_mask(name):
    if name == "causal":
        return lcattn.masks.Causal()
    if name == "lambda":
        return lcattn.masks.Lambda(_WINDOW.value, _N_GLOBAL.value)
    raise app.UsageError(f"unknown mask {name!r}")


def attention_fn(impl, mask_obj, seq_len):
    """``(fn(q, k, v, *extra) -> out, extra args)`` for one implementation."""
    if impl == "xla":
        spec = lcattn.AttentionSpec(mask=mask_obj, normalizer=lcattn.normalizers.Softmax(),
                                    position=lcattn.positions.NoPE())
        blocks = tuple(int(b) for b in _BLOCKS.value)
        return (lambda q, k, v: lcattn.attend(q, k, v, spec, backend="xla",
                                              block_sizes=blocks)), ()
    if impl != "dense":
        raise app.UsageError(f"unknown impl {impl!r}")
    if isinstance(mask_obj, lcattn.masks.Causal):
        return (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)), ()
    pos = np.arange(seq_len, dtype=np.int32)
    dense_mask = jnp.asarray(mask_obj(pos[:, None], pos[None, :]))[None, None]  # [1,1,T,T] bool
    return (lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m)), (dense_mask,)


def dense_estimate_bytes(seq_len, mode):
    """``factor`` live ``[H, T, T]`` float32 arrays; XLA CPU measured 2 (forward) / 4 (fwd+bwd)
    at small T, so the default 3 / 6 leaves room for the Λ bool mask and allocator slack."""
    factor = _DENSE_FACTOR.value * (2 if mode == "forward_backward" else 1)
    return seq_len * seq_len * _HEADS.value * 4 * factor


def measure(impl, mask_name, mode, seq_len, qkv):
    """Compile, read memory analysis, time. Returns (record, forward output or None)."""
    fn, extra = attention_fn(impl, make_mask(mask_name), seq_len)
    if mode == "forward":
        target = fn
    else:
        target = jax.value_and_grad(lambda q, k, v, *e: jnp.sum(fn(q, k, v, *e) ** 2),
                                    argnums=(0, 1, 2))
    args = tuple(qkv) + tuple(extra)
    rec, out = compile_and_time(target, args, _REPEATS.value)
    return rec, (out if mode == "forward" else None)


def run_all():
    results = []
    key = jax.random.PRNGKey(0)
    for seq_len in (int(t) for t in _SEQ_LENS.value):
        shape = (1, seq_len, _HEADS.value, _HEAD_DIM.value)
        qkv = [jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(key, 3)]
        for mask_name in _MASKS.value:
            for mode in _MODES.value:
                outs, recs = {}, {}
                for impl in _IMPLS.value:
                    base = {"T": seq_len, "mask": mask_name, "mode": mode, "impl": impl}
                    est = dense_estimate_bytes(seq_len, mode)
                    if impl == "dense" and est > _DENSE_GIB.value * GIB:
                        reason = (f"estimated {est / GIB:.3g} GiB > budget "
                                  f"{_DENSE_GIB.value:g} GiB (--dense_memory_gib)")
                        results.append({**base, "skipped": reason})
                        log(f"T={seq_len} {mask_name} {mode} {impl}: skipped ({reason})")
                        continue
                    try:
                        rec, outs[impl] = measure(impl, mask_name, mode, seq_len, qkv)
                    except Exception as e:  # pylint: disable=broad-except
                        rec = {"error": f"{type(e).__name__}: {e}"[:500]}
                    if impl == "dense":
                        rec["estimated_bytes"] = int(est)
                    recs[impl] = {**base, **rec}
                    results.append(recs[impl])
                    log(f"T={seq_len} {mask_name} {mode} {impl}: "
                        + (f"{rec['seconds']:.4f}s, peak {rec['peak_bytes'] / GIB:.3f} GiB"
                           if "seconds" in rec else rec["error"]))
                    gc.collect()
                if outs.get("xla") is not None and outs.get("dense") is not None:
                    diff = float(jnp.max(jnp.abs(outs["xla"] - outs["dense"])))
                    recs["dense"]["max_abs_diff_vs_xla"] = diff
                del outs, recs
                gc.collect()
    return results


def ratios(results):
    by_key = {(r["T"], r["mask"], r["mode"], r["impl"]): r for r in results}
    rows = []
    for (t, mask, mode, impl), xla_rec in by_key.items():
        dense = by_key.get((t, mask, mode, "dense"))
        if impl != "xla" or dense is None:
            continue
        row = {"T": t, "mask": mask, "mode": mode, "speedup": None, "memory_ratio": None}
        if "seconds" in dense and "seconds" in xla_rec:
            row["speedup"] = dense["seconds"] / xla_rec["seconds"]
            row["memory_ratio"] = dense["peak_bytes"] / max(xla_rec["peak_bytes"], 1)
        else:
            row["note"] = dense.get("skipped") or dense.get("error") or xla_rec.get("error")
        rows.append(row)
    return rows


def plot(report, path):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    cfg = report["config"]
    for col, mode in enumerate(("forward", "forward_backward")):
        for impl in cfg["impls"]:
            for mask in cfg["masks"]:
                rows = sorted((r for r in report["results"] if r["mode"] == mode
                               and r["impl"] == impl and r["mask"] == mask and "seconds" in r),
                              key=lambda r: r["T"])
                if not rows:
                    continue
                ts = [r["T"] for r in rows]
                style = dict(color={"xla": "tab:blue", "dense": "tab:red"}[impl],
                             linestyle="-" if mask == "causal" else "--",
                             marker="o" if mask == "causal" else "x", label=f"{impl} / {mask}")
                axes[0, col].plot(ts, [r["seconds"] for r in rows], **style)
                axes[1, col].plot(ts, [r["peak_bytes"] / GIB for r in rows], **style)
        axes[0, col].set_title(f"{mode}: median time")
        axes[0, col].set_ylabel("seconds")
        axes[1, col].set_title(f"{mode}: peak memory (memory_analysis)")
        axes[1, col].set_ylabel("GiB")
        axes[1, col].set_xlabel("sequence length T")
        for row in range(2):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"lcattn xla vs dense dot_product_attention on CPU "
                 f"(heads={cfg['heads']}, head_dim={cfg['head_dim']}, blocks={cfg['block_sizes']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name, values, allowed in (("masks", _MASKS.value, {"causal", "lambda"}),
                                  ("modes", _MODES.value, {"forward", "forward_backward"}),
                                  ("impls", _IMPLS.value, {"xla", "dense"})):
        if not set(values) <= allowed:
            raise app.UsageError(f"--{name} must be a subset of {sorted(allowed)}, got {values}")
    if len(_BLOCKS.value) != 2:
        raise app.UsageError(f"--block_sizes must be two integers, got {_BLOCKS.value}")
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "processor": platform.processor(), "python": platform.python_version(),
               "jax_version": jax.__version__, "jax_backend": jax.default_backend(),
               "devices": [str(d) for d in jax.devices()]}
    config = {"seq_lens": [int(t) for t in _SEQ_LENS.value], "masks": _MASKS.value,
              "lambda_mask": [_WINDOW.value, _N_GLOBAL.value], "modes": _MODES.value,
              "impls": _IMPLS.value, "batch": 1, "heads": _HEADS.value,
              "head_dim": _HEAD_DIM.value, "dtype": "float32",
              "block_sizes": [int(b) for b in _BLOCKS.value], "repeats": _REPEATS.value,
              "warmup": 1, "dense_memory_gib": _DENSE_GIB.value,
              "dense_factor": _DENSE_FACTOR.value,
              "peak_bytes": "temp + argument + output bytes from memory_analysis()",
              "dense_lambda_mask": "numpy bool [1,1,T,T], passed as an argument"}
    log(f"machine: {machine}")
    results = run_all()
    report = {"machine": machine, "config": config, "results": results,
              "ratios": ratios(results)}
    emit(report, _OUT.value, plot)


if __name__ == "__main__":
    app.run(main)
