"""Figure 1 — LM-Infinite: NLL against token position far past the training length.

Softmax + RoPE trained at length ``L`` and evaluated at 16 ``L`` as trained, the *same
checkpoint* under LM-Infinite (``Lambda(L, 10)`` mask with distance limit ``L``, training-free:
``configs/attention/lminfinite.gin``), and ALiBi / NoPE models trained like it. Curves are the
per-position NLL at the longest eval length, averaged in log-spaced position bins, mean ± std
over seeds; the dashed line marks ``L``.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from experiments.figures import common

NAME = "lminfinite_nll"
TITLE = "LM-Infinite: NLL vs position past the training length"
PAPER = ("Han et al., LM-Infinite (NAACL 2024), NLL-vs-position figure: Llama-2 (trained at "
         "4k) stays flat to 128k and beyond under LM-Infinite; without it the NLL explodes just "
         "past 4k. The paper plots curves and gives no table for this figure")
RUNS = {"softmax_rope": common.SOFTMAX_ROPE, "lminfinite": common.LMINFINITE,
        "alibi": common.ALIBI, "nope": common.NOPE}
PAPER_SHAPE = {"softmax_rope": "explodes past the train length",
               "lminfinite": "flat (training-free)", "alibi": "not in this figure",
               "nope": "not in this figure"}


def log_bins(curve: np.ndarray, num_bins: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``curve`` ``[T]`` (position 0..T-1) over log-spaced bins of positions ≥ 1:
    ``(bin centres [B], means [B])``, empty bins dropped."""
    edges = np.unique(np.round(np.geomspace(1, len(curve), num_bins + 1)).astype(int))
    centres = np.sqrt(edges[:-1] * edges[1:])
    means = np.array([curve[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    return centres, means


def compute(pool, preset: str) -> dict:
    out = {"variants": {}}
    for name, run in RUNS.items():
        curves, losses = [], pool.losses(run)
        for seed in pool.scale.seeds:
            nll = pool.nll_by_position(run, seed)[-1]
            centres, means = log_bins(nll[np.isfinite(nll)])
            curves.append(means)
        curves = np.stack(curves)
        out["variants"][name] = {
            "positions": centres.tolist(), "nll_mean": curves.mean(0).tolist(),
            "nll_std": curves.std(0, ddof=1).tolist() if len(curves) > 1 else [0.0] * len(centres),
            "loss_by_length": {str(k): v for k, v in sorted(losses.items())}}
        first = pool.evaluation(run, pool.scale.seeds[0])
    out["train_length"] = first["length_unit"]
    out["lengths"] = first["lengths"]
    return out


def draw(data: dict, preset: str):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, v in data["variants"].items():
        x, m, s = (np.asarray(v[k]) for k in ("positions", "nll_mean", "nll_std"))
        ax.plot(x, m, lw=1.4, label=name)
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.axvline(data["train_length"], ls="--", color="gray", lw=1)
    ax.text(data["train_length"], ax.get_ylim()[1], " train length", va="top", fontsize=8,
            color="gray")
    ax.set(xscale="log", xlabel="token position", ylabel="NLL (nats/byte)",
           title=f"NLL vs position at {max(data['lengths'])} tokens ({preset})")
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def table(data: dict, preset: str) -> str:
    lengths = [str(x) for x in data["lengths"]]
    lines = ["Validation loss (nats/byte), mean ± std over seeds, by eval length; last column: "
             "loss at the longest length / loss at the train length (ours), and what the paper "
             "shows for this curve.", "",
             "| variant | " + " | ".join(f"L={x}" for x in lengths)
             + " | ratio longest / 1× | paper |", "|---|" + "---|" * (len(lengths) + 2)]
    for name, v in data["variants"].items():
        by = v["loss_by_length"]
        ratio = np.asarray(by[lengths[-1]]) / np.asarray(by[lengths[0]])
        lines.append(f"| {name} | " + " | ".join(common.fmt(by[x]) for x in lengths)
                     + f" | {common.fmt(ratio, 2)} | {PAPER_SHAPE[name]} |")
    return "\n".join(lines)
