"""Precision of ``backend="pallas_gpu"`` (or ``--backend=pallas_triton``) against the float32
reference, per normalizer.

Run (from the repository root; on CPU the kernels run in the Mosaic GPU interpreter, whose
matmuls take the same bf16 operands with float32 accumulation as the compiled WGMMAs)::

    PYTHONPATH=. python -m experiments.benchmarks.gpu_precision \\
        --out=experiments/benchmarks/results/gpu_precision_cpu.json      # + .png, ~9 min
    PYTHONPATH=. python -m experiments.benchmarks.gpu_precision --backend=pallas_triton \
        --out=experiments/benchmarks/results/gpu_precision_triton_cpu.json  # Pallas interpret

Float32 unit-normal inputs ``[1, T, Hq, D]`` / ``[1, T, Hkv, D]``, loss ``sum(out²)``; for each
spec: the loss's relative error, max |out − ref|, and for dQ, dK, dV the max |grad − ref| over
the max |ref| (the figure the tests bound). Specs: Softmax causal, Λ + ALiBi, LSSA causal,
LSSAR (p = 15) causal with its exact ``QKᵀ`` (``pallas_gpu``: ``split_qk``, float32 q, k as
two bf16 halves; ``pallas_triton``: float32 operands) and, for comparison in the same run, with
plain bf16 ``QKᵀ`` (``lssar_bf16_scores``): what a user of bf16 kernels would otherwise get.
``bf16 / split`` ratios of the LSSAR gradient errors (``lssar_bf16_over_split``, "split"
meaning the backend's exact scores) are in the report.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags

import lcattn
from experiments.benchmarks.timing import emit, log
from lcattn import masks, normalizers, positions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length T.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension D.")
_HEADS = flags.DEFINE_list("heads", ["8", "2"], "Query heads, kv heads.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON report here (and a PNG).")
_BACKEND = flags.DEFINE_enum("backend", "pallas_gpu", ["pallas_gpu", "pallas_triton"],
                             "The GPU kernels' backend to measure.")
INTERPRETERS = {"pallas_gpu": "Mosaic GPU interpreter", "pallas_triton": "Pallas interpret mode"}


@dataclasses.dataclass(frozen=True)
class BF16Scores(normalizers.Reweighted):
    """LSSAR with ``QKᵀ`` from bf16 operands in the GPU kernels (no split): the comparison."""

    amplifies_score_error = False


def specs(t: int) -> dict:
    w = max(t // 4, 16)
    return {
        "softmax_causal": lcattn.AttentionSpec(masks.Causal()),
        "softmax_lambda_alibi": lcattn.AttentionSpec(masks.Lambda(w, 8),
                                                     position=positions.ALiBi()),
        "lssa_causal": lcattn.AttentionSpec(masks.Causal(), normalizers.Softplus()),
        "lssar_causal": lcattn.AttentionSpec(masks.Causal(), normalizers.Reweighted()),
        "lssar_bf16_scores": lcattn.AttentionSpec(masks.Causal(), BF16Scores()),
    }


def measure(spec, q, k, v) -> dict:
    def loss(backend):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(lcattn.attend(
            q, k, v, spec, backend=backend) ** 2), argnums=(0, 1, 2)))

    (got, grads), (want, ref) = loss(_BACKEND.value)(q, k, v), loss("reference")(q, k, v)
    out = lcattn.attend(q, k, v, spec, backend=_BACKEND.value)
    out_ref = lcattn.attend(q, k, v, spec, backend="reference")
    row = {"loss_rel_error": float(abs(got - want) / abs(want)),
           "out_max_abs_error": float(jnp.max(jnp.abs(out - out_ref)))}
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        row[f"{name}_error_of_max"] = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
    return row


def _plot(report, path):
    rows = report["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.25
    for i, grad in enumerate(("dq", "dk", "dv")):
        ax.bar(np.arange(len(names)) + (i - 1) * width,
               [100 * rows[n][f"{grad}_error_of_max"] for n in names], width, label=grad)
    ax.set(xticks=np.arange(len(names)), yscale="log",
           ylabel="max |grad - ref| / max |ref| (%)",
           title=f"{report['backend']} ({report['kernels']}) vs float32 reference, "
                 f"T={report['seq_len']}, D={report['head_dim']}")
    ax.set_xticklabels(names, fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    t, d = _SEQ_LEN.value, _HEAD_DIM.value
    hq, hk = (int(h) for h in _HEADS.value)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, h, d)), jnp.float32) for h in (hq, hk, hk))
    rows, t0 = {}, time.perf_counter()
    cases = specs(t)
    for i, (name, spec) in enumerate(cases.items()):
        rows[name] = measure(spec, q, k, v)
        done = time.perf_counter() - t0
        log(f"{name}: {rows[name]}; {done:.0f}s elapsed, "
            f"ETA {done / (i + 1) * (len(cases) - i - 1):.0f}s")
    split, plain = rows["lssar_causal"], rows["lssar_bf16_scores"]
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "jax": jax.__version__},
              "device": jax.devices()[0].device_kind, "seq_len": t, "head_dim": d,
              "backend": _BACKEND.value,
              "kernels": ("compiled" if jax.default_backend() == "gpu"
                          else INTERPRETERS[_BACKEND.value]),
              "heads": [hq, hk], "rows": rows,
              "lssar_bf16_over_split": {g: plain[f"{g}_error_of_max"] / split[f"{g}_error_of_max"]
                                        for g in ("dq", "dk", "dv")}}
    emit(report, _OUT.value, _plot)


if __name__ == "__main__":
    app.run(main)
