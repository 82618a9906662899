"""GPU attention: ``backend="pallas_gpu"`` against cuDNN, jax's Mosaic GPU attention and ``xla``.

Run on one H100 / H200 (from the repository root)::

    PYTHONPATH=. python -m experiments.benchmarks.attention_gpu \\
        --out=experiments/benchmarks/results/attention_gpu.json      # + .png

bf16, D = 128, B = 1, Hq = 32, Hkv in ``--kv_heads`` (32, 8), T in ``--seq_lens`` (4k, 16k,
64k); masks Causal, Local(4096), Λ(4096, 64); ``forward`` and ``forward_backward``
(``value_and_grad`` of a weighted sum w.r.t. q, k, v); no position encoding (``NoPE``, as
the cuDNN and ``mgpu`` calls have none). Implementations, each timed in the same run:

* ``pallas_gpu``: ``lcattn.attend(backend="pallas_gpu")`` (Mosaic GPU forward, dQ and dK/dV
  kernels);
* ``xla``: ``lcattn.attend(backend="xla")``;
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, causal; for Local and
  Λ its sliding window of 4096 (a bound: Λ's 64 sink columns are not in it);
* ``mgpu``: jax's own ``pallas/ops/gpu/attention_mgpu.attention`` (forward, Causal only);
* ``kernel`` / ``kernel_pingpong``: ``pallas_kernels.gpu.flash_attention_pass`` called
  directly (forward, Softmax, at the smallest ``--kv_heads``) without and with the ping-pong
  schedule between its two compute warpgroups: the measurement that decides
  ``pallas_kernels.gpu.flash_attention.PINGPONG``;
* ``pallas_triton``: ``lcattn.attend(backend="pallas_triton")``, the Pallas Triton kernels
  that ``pallas_gpu`` falls back to on GPUs without WGMMA (forward only, to keep the run
  short; at the smallest ``--kv_heads``).

Per run: median seconds, TFLOP/s on the *visible pairs* (``4 D`` flops per visible pair
forward, 2.5× that backward, the FlashAttention convention) and on the *visited tiles* of the
128 × 128 block lists, its % of 989 TFLOP/s (H100/H200 dense bf16), and the max |error| of
the output against ``xla``. ``--smoke``: tiny shapes on CPU (the Mosaic GPU interpreter;
cuDNN and ``mgpu`` skipped) to check that the script runs. Progress lines with an ETA go to
stderr; with ``--out``, the rows so far are written there after every case (a run cut
short by a time limit keeps them).
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags

import lcattn
from experiments.benchmarks.timing import compile_and_time, emit, log
from lcattn import masks, normalizers, positions
from pallas_kernels import block_sparse, gpu

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "16384", "65536"], "Sequence lengths.")
_KV_HEADS = flags.DEFINE_list("kv_heads", ["32", "8"], "KV head counts (Hq = 32).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per run.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes on CPU (interpreter): a script check.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON report here (and a PNG).")
PEAK_TFLOPS = 989.0
FORWARD_ONLY = ("mgpu", "kernel", "kernel_pingpong", "pallas_triton")
BLOCK = 128


def _masks(window: int, sinks: int) -> dict:
    return {"causal": masks.Causal(), f"local{window}": masks.Local(window),
            f"lambda{window}_{sinks}": masks.Lambda(window, sinks)}


def _pairs(mask, t: int) -> tuple[int, int]:
    """(visible pairs, pairs in the visited 128 x 128 tiles) of a T x T self-attention."""
    pos = np.arange(t)[None]
    visible = int(np.sum(mask.count(pos, 0, t - 1)))
    tiles = block_sparse.tile_classes(mask, pos, pos, min(BLOCK, t), min(BLOCK, t))
    return visible, int(np.sum(tiles != 0)) * min(BLOCK, t) ** 2


def _kernel_forward(mask, t: int, pingpong: bool):
    """The Mosaic GPU forward kernel itself on ``[B, T, H, D]`` inputs (softmax)."""
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (1, t))
    heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731

    def run(q, k, v):
        out, _ = gpu.flash_attention_pass(
            heads(q * q.shape[-1] ** -0.5), heads(k), heads(v), {}, mask=mask,
            normalizer=normalizers.Softmax(), q_positions=pos, k_positions=pos,
            pingpong=pingpong, interpret=None if jax.default_backend() == "gpu" else True)
        return heads(out)

    return run


def _impls(mask_name: str, mask, window: int, d: int, smoke: bool, t: int,
           kernels: bool) -> dict:
    """name -> f(q, k, v) in [B, T, H, D] for this mask (those that can run it)."""
    spec = lcattn.AttentionSpec(mask=mask, position=positions.NoPE())  # as cuDNN and mgpu
    impls = {b: (lambda q, k, v, b=b: lcattn.attend(q, k, v, spec, backend=b))
             for b in ("xla", "pallas_gpu")}  # xla first: the others' error is against it
    if kernels:
        impls["kernel"] = _kernel_forward(mask, t, False)
        impls["kernel_pingpong"] = _kernel_forward(mask, t, True)
        impls["pallas_triton"] = lambda q, k, v: lcattn.attend(q, k, v, spec,
                                                               backend="pallas_triton")
    if smoke:
        return impls
    window_kw = {} if mask_name == "causal" else dict(local_window_size=(window - 1, 0))
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn", **window_kw)
    if mask_name == "causal":
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                             causal=True)
        impls["mgpu"] = lambda q, k, v: attention_mgpu.attention(q * d ** -0.5, k, v, config)
    return impls


def run_rows() -> list[dict]:
    smoke = _SMOKE.value
    seq_lens = [256] if smoke else [int(t) for t in _SEQ_LENS.value]
    kv_heads = [2] if smoke else [int(h) for h in _KV_HEADS.value]
    hq, d, window, sinks = (4, 64, 64, 16) if smoke else (32, 128, 4096, 64)
    cases = [(t, hk, name, mask) for t in seq_lens for hk in kv_heads
             for name, mask in _masks(window, sinks).items()]
    rows, t0 = [], time.perf_counter()
    for i, (t, hk, name, mask) in enumerate(cases):
        rng = np.random.default_rng(i)
        q, k, v, cot = (jnp.asarray(rng.normal(size=(1, t, h, d)), jnp.bfloat16)
                        for h in (hq, hk, hk, hq))
        visible, visited = _pairs(mask, t)
        fwd_flops = 4 * hq * d
        reference = None
        impls = _impls(name, mask, window, d, smoke, t, hk == min(kv_heads))
        for impl, fn in impls.items():
            for mode in ("forward", "forward_backward"):
                if impl in FORWARD_ONLY and mode == "forward_backward":
                    continue
                run = fn if mode == "forward" else jax.value_and_grad(
                    lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot),
                    argnums=(0, 1, 2))
                row = {"seq_len": t, "kv_heads": hk, "mask": name, "impl": impl, "mode": mode}
                try:
                    rec, out = compile_and_time(run, (q, k, v), _REPEATS.value)
                except Exception as err:  # an implementation that cannot run here: say so
                    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    rows.append(row)
                    log(f"{name} T={t} Hkv={hk} {impl} {mode}: {row['error'][:120]}")
                    continue
                scale = 1.0 if mode == "forward" else 3.5
                secs = rec["seconds"]
                row.update(seconds=secs, compile_seconds=rec["compile_seconds"],
                           tflops_visible=scale * fwd_flops * visible / secs / 1e12,
                           tflops_visited=scale * fwd_flops * visited / secs / 1e12)
                row["percent_of_peak"] = 100 * row["tflops_visible"] / PEAK_TFLOPS
                if mode == "forward":
                    if impl == "xla":
                        reference = out
                    elif reference is not None:
                        row["max_abs_error_vs_xla"] = float(jnp.max(jnp.abs(
                            out.astype(jnp.float32) - reference.astype(jnp.float32))))
                rows.append(row)
        if _OUT.value:  # the rows so far, in case a time limit cuts the run
            pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(_OUT.value).write_text(json.dumps({"partial": True, "rows": rows}))
        done = time.perf_counter() - t0
        log(f"case {i + 1}/{len(cases)} ({name} T={t} Hkv={hk}) done; "
            f"{done:.0f}s elapsed, ETA {done / (i + 1) * (len(cases) - i - 1):.0f}s")
    return rows


def _plot(report, path):
    rows = [r for r in report["rows"] if "seconds" in r and r["kv_heads"] == report["plot_hkv"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mode in zip(axes, ("forward", "forward_backward")):
        for impl in sorted({r["impl"] for r in rows}):
            for name in sorted({r["mask"] for r in rows}):
                pts = sorted((r["seq_len"], r["tflops_visible"]) for r in rows
                             if r["impl"] == impl and r["mask"] == name and r["mode"] == mode)
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"{impl} {name}")
        ax.set(xscale="log", xlabel="T", title=f"{mode} (Hkv={report['plot_hkv']})")
    axes[0].set_ylabel("TFLOP/s on visible pairs")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    devices = jax.devices()
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "device": devices[0].device_kind, "jax": jax.__version__},
              "smoke": _SMOKE.value, "peak_tflops": PEAK_TFLOPS,
              "rows": run_rows()}
    report["plot_hkv"] = report["rows"][0]["kv_heads"] if report["rows"] else None
    emit(report, _OUT.value, _plot)


if __name__ == "__main__":
    app.run(main)
