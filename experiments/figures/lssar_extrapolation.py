"""Figure 3 — LSSAR's length-extrapolation table: validation loss at 1, 2, 4, 8, 16× the
training length for softmax, LSSA (``Softplus()``) and LSSAR (``Reweighted(p)``, p = 3 and
15), all with RoPE, each trained at the train length and evaluated as trained.

The paper's numbers (arXiv 2501.13428, Table: train length 1K) are absolute losses of a far
larger model on another corpus; what carries over is the *ratio* to the 1× loss, which the
table puts beside ours.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from experiments.figures import common

NAME = "lssar_extrapolation"
TITLE = "LSSA / LSSAR length extrapolation (validation loss vs eval length)"
PAPER = ("Gao et al., arXiv 2501.13428 (softplus attention with re-weighting), length-"
         "extrapolation table at train length 1K: LSSA alone does not extrapolate, LSSAR with "
         "p = 15 stays within 4 % of its 1× loss at 8×")
RUNS = {"softmax": common.SOFTMAX_ROPE, "lssa": common.LSSA, "lssar_p3": common.LSSAR_P3,
        "lssar_p15": common.LSSAR_P15}
# multiplier -> loss, from the paper's table (1K train length); None: not reported
PAPER_LOSS = {
    "softmax": {1: 3.19, 2: None, 4: None, 8: 6.28},
    "lssa": {1: 3.19, 2: 4.13, 4: 5.30, 8: 5.94},
    "lssar_p3": {1: 3.18, 2: 4.24, 4: 5.41, 8: 6.30},
    "lssar_p15": {1: 3.19, 2: 3.19, 4: 3.23, 8: 3.32},
}


def ratios(losses: dict[int, list[float]]) -> dict[int, list[float]]:
    """Per-seed loss at each length divided by the same seed's loss at the shortest length."""
    first = np.asarray(losses[min(losses)])
    return {k: (np.asarray(v) / first).tolist() for k, v in sorted(losses.items())}


def compute(pool, preset: str) -> dict:
    out = {"variants": {}}
    for name, run in RUNS.items():
        losses = pool.losses(run)
        out["variants"][name] = {"loss": {str(k): v for k, v in sorted(losses.items())},
                                 "ratio": {str(k): v for k, v in ratios(losses).items()}}
    first = pool.evaluation(common.SOFTMAX_ROPE, pool.scale.seeds[0])
    out["train_length"], out["lengths"] = first["length_unit"], first["lengths"]
    return out


def draw(data: dict, preset: str):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    mults = [length // data["train_length"] for length in data["lengths"]]
    for i, (name, v) in enumerate(data["variants"].items()):
        color = f"C{i}"
        for axis, key in ((ax, "loss"), (bx, "ratio")):
            vals = [v[key][str(length)] for length in data["lengths"]]
            mean = [np.mean(x) for x in vals]
            std = [np.std(x, ddof=1) if len(x) > 1 else 0.0 for x in vals]
            axis.errorbar(mults, mean, yerr=std, fmt="o-", color=color, capsize=3,
                          label=f"{name} (ours)")
        paper = PAPER_LOSS[name]
        px = [m for m, x in paper.items() if x is not None]
        bx.plot(px, [paper[m] / paper[1] for m in px], "s--", color=color, alpha=0.6,
                label=f"{name} (paper)")
    for axis, ylabel in ((ax, "validation loss (nats/byte)"), (bx, "loss / loss at 1×")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(mults, [f"{m}×" for m in mults])
        axis.minorticks_off()
        axis.set(xlabel="eval length / train length", ylabel=ylabel)
    ax.set_title(f"ours ({preset}, train length {data['train_length']})")
    bx.set_title("ratio to 1×: ours (solid) vs paper (dashed)")
    ax.legend(fontsize=7)
    bx.legend(fontsize=7, ncol=2)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def table(data: dict, preset: str) -> str:
    lengths = data["lengths"]
    mults = [length // data["train_length"] for length in lengths]
    lines = ["Validation loss (nats/byte, mean ± std over seeds) and, in brackets, its ratio to "
             "the 1× loss; paper: loss (ratio) from its table (train length 1K, its own model "
             "and corpus, so compare ratios).", "",
             "| variant | source | " + " | ".join(f"{m}×" for m in mults) + " |",
             "|---|---|" + "---|" * len(mults)]
    for name, v in data["variants"].items():
        ours = [f"{common.fmt(v['loss'][str(x)])} ({common.fmt(v['ratio'][str(x)], 2)})"
                for x in lengths]
        lines.append(f"| {name} | ours | " + " | ".join(ours) + " |")
        paper = PAPER_LOSS[name]
        cells = [f"{paper[m]:.2f} ({paper[m] / paper[1]:.2f})" if paper.get(m) else "—"
                 for m in mults]
        lines.append(f"| {name} | paper | " + " | ".join(cells) + " |")
    return "\n".join(lines)
