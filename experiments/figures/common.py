"""What every figure module shares: the preset scales, mean ± std, and writing one figure's
four files (``NAME.png``, ``NAME.pdf``, ``NAME.json``, ``NAME.md``).

A figure module defines ``NAME``, ``TITLE``, ``PAPER`` (the paper and what it reports) and

* ``compute(pool, preset) -> dict``: the plotted numbers (JSON-able), from the pool's runs;
* ``draw(data, preset) -> matplotlib Figure``;
* ``table(data, preset) -> str``: markdown, ours beside the paper's numbers;
* ``CAVEATS`` (``{preset: text}``, optional): said on the figure and in the table when the
  preset does not show the paper's effect.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import matplotlib
import numpy as np

from experiments.figures.runs import Pool, Run, Scale

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("lcattn.figures")

# quick: the tiny model of configs/models/tiny.gin at train length 128 on the embedded
# corpus, two seeds (three do not fit the 15-minute budget of --figure=all on 2 CPU cores:
# a training with its evaluation takes ~40 s), no passkey unless a figure asks for it.
# paper: configs/figures/paper.gin (one H100/H200), three seeds. smoke: seconds per run
# (tests, notebooks' SMOKE mode); its numbers mean nothing.
SCALES = {
    "smoke": Scale(base_gin=("configs/base.gin", "configs/models/tiny.gin"),
                   bindings=("tasks.Passkey.trials = 0", "SEQ_LEN = 32", "train.num_steps = 6",
                             "train.warmup_steps = 1", "train.batch_size = 2",
                             "train.checkpoint_every = 6", "evaluate.length_multipliers = (1, 4)",
                             "evaluate.max_tokens = 512"),
                   seeds=(0,)),
    "quick": Scale(base_gin=("configs/base.gin", "configs/models/tiny.gin"),
                   bindings=("tasks.Passkey.trials = 0",), seeds=(0, 1)),
    "paper": Scale(base_gin=("configs/base.gin", "configs/figures/paper.gin"),
                   bindings=("tasks.Passkey.trials = 0",), seeds=(0, 1, 2)),
}

# The attention variants of figures 1-3 (one training each, per seed, shared by the figures).
ATTENTION = "configs/attention/"
SOFTMAX_ROPE = Run("softmax_rope", gin=(ATTENTION + "softmax_rope.gin",))
LMINFINITE = Run("lminfinite", gin=(ATTENTION + "lminfinite.gin",), checkpoint_from=SOFTMAX_ROPE)
ALIBI = Run("alibi", gin=(ATTENTION + "alibi.gin",))
NOPE = Run("nope", gin=(ATTENTION + "nope.gin",))
LSSA = Run("lssa", gin=(ATTENTION + "lssa.gin",))
LSSAR_P3 = Run("lssar_p3", gin=(ATTENTION + "lssar.gin",),
               bindings=("normalizers.Reweighted.p = 3",))
LSSAR_P15 = Run("lssar_p15", gin=(ATTENTION + "lssar.gin",),
                bindings=("normalizers.Reweighted.p = 15",))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a sequence of numbers."""
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fmt(values, digits: int = 3) -> str:
    """``mean ± std`` of a list of per-seed values (just the value for one seed)."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def command(name: str, preset: str) -> str:
    return f"python -m experiments.figures --figure={name} --preset={preset}"


def make(module, preset: str, workdir: str) -> dict:
    """Compute, draw and write one figure into ``workdir``; returns its data."""
    if preset not in SCALES:
        raise ValueError(f"figures: --preset must be one of {sorted(SCALES)}, got {preset!r}")
    t0 = time.perf_counter()
    pool = Pool(os.path.join(workdir, "runs"), SCALES[preset])
    data = module.compute(pool, preset)
    caveat = getattr(module, "CAVEATS", {}).get(preset)
    fig = module.draw(data, preset)
    if caveat:
        fig.text(0.5, 0.005, caveat, ha="center", va="bottom", fontsize=7, color="firebrick",
                 wrap=True)
    stem = os.path.join(workdir, module.NAME)
    os.makedirs(workdir, exist_ok=True)
    fig.savefig(stem + ".png", dpi=130)
    fig.savefig(stem + ".pdf")
    plt.close(fig)
    with open(stem + ".json", "w") as f:
        json.dump({"figure": module.NAME, "preset": preset, "seeds": list(pool.scale.seeds),
                   "data": data}, f, indent=1)
    lines = [f"# {module.TITLE}", "", f"Preset `{preset}`, seeds {list(pool.scale.seeds)}; "
             f"paper: {module.PAPER}.", ""]
    if caveat:
        lines += [f"**{caveat}**", ""]
    lines += [module.table(data, preset).rstrip(), "", "Reproduce:", "", "```",
              command(module.NAME, preset), "```", ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    log.info("figure %s (%s) written to %s.{png,pdf,json,md} in %.0fs", module.NAME, preset,
             stem, time.perf_counter() - t0)
    print(f"{module.NAME}: {stem}.png ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return data
