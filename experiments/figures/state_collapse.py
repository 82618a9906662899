"""Figure 4 — Stuffed Mamba: Mamba-2's loss far past its training length, by training length;
the training-free state-collapse mitigations; passkey accuracy over depth × length.

Chen et al. (2024, arXiv 2410.07145) find that a Mamba-2 model stays flat far past its
training length ``T_train`` only when ``T_train`` exceeds a *forget threshold* that grows
linearly with the state size ``S`` (their Fig. 11: ``T_forget ≈ 5.172·S − 4.469``, ``T`` in K
tokens, ``S`` in M state parameters); below it the loss explodes a few ``T_train`` in (their
Fig. 10, "state collapse"). Panels:

(a) their Fig. 10: per-position NLL at the longest eval length ``T`` of Mamba-2
    (``configs/models/mamba2.gin``) trained at each length of ``SIZES[preset]`` with the same
    tokens per step, log-spaced position bins (``lminfinite_nll.log_bins``), mean ± std over
    seeds; a dashed line marks each training length;
(b) the checkpoint trained at the shortest length evaluated, without training
    (``checkpoint_from``), under each mitigation of ``lcattn.ssm.SSMOptions``: decay scaling
    ``α_t → α_t^λ``, the state-norm clamp ``‖h_t‖ <= c`` per head, and the sliding window by
    state difference ``h_t^(r) = h_t − (∏_{k=t−r+1..t} α_k) h_{t−r}`` with ``r = T_train``;
(c) their Fig. 2: passkey accuracy (``experiments.tasks``), needle depth (rows, 0 % on top)
    × prompt length (columns), one heatmap per training length, red-yellow-green, each cell
    annotated with its accuracy (mean over seeds and trials).

Eval and passkey lengths are multiples of one absolute unit (``evaluate.length_unit``), so every
training length is read at the same positions, and the validation text is ``k·T_max + 1``
tokens, so every eval length reads the same text. The table's "excess" is ``excess_loss``:
loss at the longest eval length minus loss at the training length, per seed — the same
tokens, read with more context (≫ 0: collapse; <= 0: the longer context helps or is ignored).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from experiments.figures import common
from experiments.figures.lminfinite_nll import log_bins
from experiments.figures.runs import Run

NAME = "state_collapse"
TITLE = "Stuffed Mamba: Mamba-2 past its training length, mitigations, passkey"
PAPER = ("Chen et al., Stuffed Mamba (arXiv 2410.07145, COLM 2025), Fig. 10: Mamba-2 130M "
         "trained at 4K or 8K tokens explodes past about 12-20K while 16K training stays flat "
         "to 32K; 370M trained at 8K-32K explodes, 64K stays flat to 128K; Fig. 11: minimum "
         "training length to learn forgetting T_forget ≈ 5.172·S − 4.469 (K tokens; S = state "
         "size, M parameters); Fig. 2: passkey of the official 8K-trained Mamba-2 fails past a "
         "size-dependent length (v1: mitigations let Mamba-2 run past 1M tokens without "
         "collapse)")

MAMBA2 = "configs/models/mamba2.gin"
NUM_BINS = 32  # log-spaced position bins of the per-position curves
# Per preset: training lengths (same tokens per step for each), steps, the absolute eval unit
# and its multipliers (the longest eval length is unit · max(multipliers); the mitigations are
# evaluated at fewer with the same longest, to save time; each training length must be one),
# how many sequences of the longest length the validation text is cut into (``max_tokens``),
# the passkey grid, how many of the scale's seeds (None: all), extra gin files / bindings, and
# the recurrent state (layers, heads, head width P, state width N) of the model it trains.
SIZES = {
    "smoke": dict(train_lengths=(64,), tokens_per_step=256, steps=6, unit=64,
                  multipliers=(1, 4), mitigation_multipliers=(1, 4), eval_sequences=2,
                  passkey_multipliers=(4,), depths=(0.0, 1.0), trials=1, num_seeds=None,
                  gin=(), bindings=(), state=(2, 4, 64, 64)),
    # tiny.gin + mamba2.gin: 2 layers x 4 heads x 64 x 64 = 0.033M state parameters
    "quick": dict(train_lengths=(64, 512), tokens_per_step=1024, steps=100, unit=64,
                  multipliers=(1, 8, 64), mitigation_multipliers=(1, 64), eval_sequences=4,
                  passkey_multipliers=(4, 16, 64), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                  trials=2, num_seeds=2, gin=(), bindings=(), state=(2, 4, 64, 64)),
    # base.gin width with Mamba-2 state 256: 8 layers x 8 heads x 128 x 256 = 2.1M state
    # parameters (33.8M parameters in all), for which the paper's fit gives T_forget ≈ 6.4K:
    # training at 1024 should collapse, at 8192 not. Unmeasured (no GPU here): PAPER_ESTIMATE.
    "paper": dict(train_lengths=(1024, 8192), tokens_per_step=32768, steps=1000,
                  unit=1024, multipliers=(1, 8, 32), mitigation_multipliers=(1, 32),
                  eval_sequences=4,
                  passkey_multipliers=(2, 8, 32), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                  trials=4, num_seeds=2, gin=("configs/models/base.gin",),
                  bindings=("layers.Mamba2Config.state_dim = 256",
                            "train.learning_rate = 1e-3", "train.warmup_steps = 100"),
                  state=(8, 8, 128, 256)),
}
PAPER_ESTIMATE = (
    "Paper preset, estimated, not measured (no GPU was available): 4 trainings (2 training "
    "lengths x 2 seeds) of a 33.8M-parameter Mamba-2, 1,000 steps of 32,768 tokens (~6.6 "
    "TFLOP per step; ~0.05 s per step at ~130 TFLOP/s, plus ~30 s of compilation): ~80 s "
    "each; evaluation to 32K tokens with the passkey grid ~20 s per training and ~15 s per "
    "mitigation (the state clamp runs the sequential scan): ~7 minutes in all on one H100/H200; "
    "peak memory ~20-40 GB (activations of 32K tokens x 8 layers). If it runs over 8 minutes, "
    "set num_seeds=1.")
CAVEATS = {
    "smoke": "Smoke preset: 6 training steps, one training length, one seed; it tests the code "
             "path and its numbers mean nothing.",
    "quick": "No state collapse at this scale, as the paper's fit predicts for a 0.033M-parameter "
             "state: the tiny Mamba-2 trained 100 steps at 64 or 512 bytes reads 4096 bytes "
             "with no loss increase (excess <= 0), so the training-free mitigations have "
             "nothing to fix (they change the loss by ~0.001); passkey accuracy is 0 in every "
             "cell (a tiny byte-level model does not retrieve). The paper's effect needs the "
             "paper preset (not run here).",
}
# name -> (label, the SSMOptions binding; {L}: the source's training length)
MITIGATIONS = {
    "decay1.5": ("decay scale λ=1.5", "ssm.SSMOptions.decay_scale = 1.5"),
    "stateclip1": ("state-norm clamp c=1", "ssm.SSMOptions.state_clip = 1.0"),
    "window": ("window by state difference r={L}", "ssm.SSMOptions.window = {L}"),
}


def state_size(layers: int, heads: int, head_dim: int, state_dim: int) -> int:
    """Recurrent state parameters of the model, ``layers · heads · P · N`` (the paper's S)."""
    return layers * heads * head_dim * state_dim


def forget_threshold(state_params: int) -> float:
    """The paper's linear fit (Fig. 11), in tokens: ``1000 · (5.172 · S/1e6 − 4.469)``;
    negative means the fit puts the threshold below any training length."""
    return 1000.0 * (5.172 * state_params / 1e6 - 4.469)


def excess_loss(loss_by_length: dict, train_length: int) -> float:
    """``loss[T_max] − loss[T_train]`` from an ``eval.json`` ``loss`` dict (eval length as a
    string -> loss); both lengths read the same validation tokens, so this is the cost (> 0) or
    gain (< 0) of reading them with up to ``T_max`` tokens of context instead of ``T_train``."""
    if str(train_length) not in loss_by_length:
        raise ValueError(f"excess_loss: training length {train_length} is not an eval length "
                         f"({sorted(loss_by_length, key=int)})")
    longest = max(loss_by_length, key=int)
    return float(loss_by_length[longest] - loss_by_length[str(train_length)])


def depth_by_length(accuracy, lengths, depths) -> tuple[np.ndarray, list, list]:
    """Passkey ``accuracy`` ``[lengths][depths]`` (as in ``eval.json``) as the heatmap matrix
    ``[depths, lengths]`` with depths ascending (row 0 = depth 0 %, drawn on top) and lengths
    ascending; returns ``(matrix, sorted lengths, sorted depths)``."""
    accuracy = np.asarray(accuracy, float)
    li, di = np.argsort(lengths, kind="stable"), np.argsort(depths, kind="stable")
    return (accuracy[np.ix_(li, di)].T, [lengths[i] for i in li], [depths[i] for i in di])


def band(curves) -> dict:
    """Mean and sample std (0 for one curve) over seeds of ``curves`` ``[seeds, B]``."""
    curves = np.asarray(curves, float)
    std = curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
    return {"mean": curves.mean(0).tolist(), "std": std.tolist()}


def max_tokens(size: dict) -> int:
    """``evaluate.max_tokens`` giving ``eval_sequences`` sequences at the longest eval length:
    ``k·T_max + 1`` tokens, so every eval length (a divisor of ``T_max``) reads the same text."""
    return size["eval_sequences"] * size["unit"] * max(size["multipliers"]) + 1


def _bindings(size: dict, length: int, multipliers, passkey: bool) -> tuple[str, ...]:
    return tuple(size["bindings"]) + (
        f"SEQ_LEN = {length}", f"train.batch_size = {size['tokens_per_step'] // length}",
        f"train.num_steps = {size['steps']}", f"train.checkpoint_every = {size['steps']}",
        f"evaluate.length_unit = {size['unit']}",
        f"evaluate.length_multipliers = {tuple(multipliers)}",
        f"evaluate.max_tokens = {max_tokens(size)}",
        f"tasks.Passkey.multipliers = {tuple(size['passkey_multipliers'])}",
        f"tasks.Passkey.depths = {tuple(size['depths'])}",
        f"tasks.Passkey.trials = {size['trials'] if passkey else 0}")


def runs(preset: str) -> tuple[dict[int, Run], dict[str, Run]]:
    """The trained runs (training length -> Run) and the mitigation runs on the shortest
    one's checkpoint (MITIGATIONS key -> Run) of ``preset``."""
    size = SIZES[preset]
    gin = tuple(size["gin"]) + (MAMBA2,)
    trained = {length: Run(f"mamba2_train{length}", gin=gin,
                           bindings=_bindings(size, length, size["multipliers"],
                                              passkey=True))
               for length in size["train_lengths"]}
    shortest = min(trained)
    mitigated = {key: Run(f"mamba2_train{shortest}_{key}", gin=gin,
                          bindings=_bindings(size, shortest, size["mitigation_multipliers"],
                                             passkey=False)
                          + (binding.format(L=shortest),),
                          checkpoint_from=trained[shortest])
                 for key, (_, binding) in MITIGATIONS.items()}
    return trained, mitigated


def seeds_used(pool, preset: str) -> list[int]:
    n = SIZES[preset]["num_seeds"]
    return list(pool.scale.seeds if n is None else pool.scale.seeds[:n])


def _summary(pool, run: Run, seeds, train_length: int) -> dict:
    curves, excess, losses, passkeys = [], [], {}, []
    for seed in seeds:
        nll = pool.nll_by_position(run, seed)[-1]
        nll = nll[np.isfinite(nll)]
        centres, means = log_bins(nll, NUM_BINS)
        curves.append(means)
        ev = pool.evaluation(run, seed)
        excess.append(excess_loss(ev["loss"], train_length))
        for length, loss in ev["loss"].items():
            losses.setdefault(length, []).append(loss)
        if ev["passkey"] is not None:
            passkeys.append(ev["passkey"])
    out = {"positions": centres.tolist(), **band(curves), "excess": excess,
           "loss_by_length": losses, "lengths": ev["lengths"]}
    if passkeys:
        p = passkeys[0]
        acc = np.mean([q["accuracy"] for q in passkeys], axis=0)
        matrix, lengths, depths = depth_by_length(acc, p["lengths"], p["depths"])
        out["passkey"] = {"accuracy": matrix.tolist(), "lengths": lengths, "depths": depths,
                          "prompts_per_cell": p["trials"] * len(passkeys)}
    return out


def compute(pool, preset: str) -> dict:
    size, seeds = SIZES[preset], seeds_used(pool, preset)
    trained, mitigated = runs(preset)
    shortest = min(trained)
    out = {"seeds": seeds, "scale_seeds": list(pool.scale.seeds),
           "state_params": state_size(*size["state"]),
           "train_lengths": sorted(trained), "shortest": shortest,
           "trained": {str(length): _summary(pool, run, seeds, length)
                       for length, run in sorted(trained.items())},
           "mitigations": {"none": None}}
    out["mitigations"]["none"] = {"label": "none", **out["trained"][str(shortest)]}
    for key, run in mitigated.items():
        out["mitigations"][key] = {"label": MITIGATIONS[key][0].format(L=shortest),
                                   **_summary(pool, run, seeds, shortest)}
    out["lengths"] = out["trained"][str(shortest)]["lengths"]
    out["mitigation_lengths"] = next(v["lengths"] for key, v in out["mitigations"].items()
                                     if key != "none")
    out["forget_threshold"] = forget_threshold(out["state_params"])
    return out


def _curves(ax, items, title, longest):
    """One band per ``(label, summary, train length or None)``; the legend gives each curve's
    loss at the longest eval length (mean over seeds)."""
    for i, (label, v, train_length) in enumerate(items):
        x, m, s = (np.asarray(v[k]) for k in ("positions", "mean", "std"))
        loss = np.mean(v["loss_by_length"][str(longest)])
        ax.plot(x, m, lw=1.4, color=f"C{i}", ls=("-", "--", "-.", ":")[i % 4],
                label=f"{label} (loss {loss:.3f})")
        ax.fill_between(x, m - s, m + s, alpha=0.2, color=f"C{i}")
        if train_length is not None:
            ax.axvline(train_length, ls="--", lw=1, color=f"C{i}")
    ax.set(xscale="log", xlabel="token position", ylabel="NLL (nats/byte)", title=title)
    ax.legend(fontsize=7)


def draw(data: dict, preset: str):
    longest = max(data["lengths"])
    trained = [(length, data["trained"][str(length)]) for length in data["train_lengths"]]
    passkeys = [(length, v["passkey"]) for length, v in trained if "passkey" in v]
    fig = plt.figure(figsize=(11, 7.8 if passkeys else 4.4))
    grid = fig.add_gridspec(2 if passkeys else 1, 1,
                            height_ratios=(1.2, 1) if passkeys else None, hspace=0.45)
    top = grid[0].subgridspec(1, 2, wspace=0.25)
    _curves(fig.add_subplot(top[0]), [(f"trained at {t}", v, t) for t, v in trained],
            f"(a) NLL vs position at T = {longest}, by training length", longest)
    shortest = data["shortest"]
    _curves(fig.add_subplot(top[1]),
            [(v["label"], v, shortest if key == "none" else None)
             for key, v in data["mitigations"].items()],
            f"(b) trained at {shortest}: training-free mitigations", longest)
    if passkeys:
        bottom = grid[1].subgridspec(1, len(passkeys) + 1, wspace=0.3,
                                     width_ratios=[1] * len(passkeys) + [0.05])
        for i, (length, p) in enumerate(passkeys):
            ax = fig.add_subplot(bottom[i])
            acc = np.asarray(p["accuracy"])
            im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            for (r, c), value in np.ndenumerate(acc):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 0.2 or value > 0.85 else "black")
            ax.set(xticks=range(len(p["lengths"])), xticklabels=p["lengths"],
                   yticks=range(len(p["depths"])),
                   yticklabels=[f"{100 * d:.0f}" for d in p["depths"]],
                   xlabel="prompt length (bytes)", title=f"(c) passkey, trained at {length}")
            if i == 0:
                ax.set_ylabel("needle depth (%)")
        fig.colorbar(im, cax=fig.add_subplot(bottom[-1]), label="accuracy")
    fig.suptitle(f"Mamba-2 state collapse ({preset}; seeds {data['seeds']}; state "
                 f"{data['state_params'] / 1e6:.3g}M parameters)", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.95, top=0.91, bottom=0.12)
    return fig


def _loss_rows(items, lengths):
    return [f"| {label} | " + " | ".join(common.fmt(v["loss_by_length"][str(x)])
                                         for x in lengths)
            + f" | {common.fmt(v['excess'])} | {paper} |" for label, v, paper in items]


def _head(first: str, lengths) -> list[str]:
    return ["| " + first + " | " + " | ".join(f"L={x}" for x in lengths) + " | excess | paper |",
            "|---|" + "---|" * (len(lengths) + 2)]


def table(data: dict, preset: str) -> str:
    lengths = data["lengths"]
    seeds = data["seeds"]
    note = ("" if seeds == data["scale_seeds"] else
            f" Seeds used: {seeds} of the preset's {data['scale_seeds']} (time budget).")
    threshold = data["forget_threshold"]
    fit = (f"{threshold / 1000:.1f}K tokens" if threshold > 0 else
           "below zero, i.e. forgetting should be learned at any training length")
    lines = [
        f"Mamba-2 with {data['state_params']:,} state parameters; the paper's fit "
        f"(Fig. 11) puts its forget threshold at {fit}.{note}", "",
        "Validation loss (nats/byte) by eval length (every length reads the same validation "
        "tokens), mean ± std over seeds; excess: loss at the longest length minus loss at the "
        "training length, per seed (≫ 0 means collapse; < 0: the longer context helps).", "",
        *_head("trained at", lengths)]
    paper_a = "Fig. 10: explodes when T_train < T_forget, flat otherwise"
    lines += _loss_rows([(str(t), data["trained"][str(t)], paper_a)
                         for t in data["train_lengths"]], lengths)
    mitigation_lengths = data["mitigation_lengths"]
    lines += ["", f"Training-free mitigations on the checkpoint trained at {data['shortest']}:",
              "", *_head("mitigation", mitigation_lengths)]
    lines += _loss_rows([(v["label"], v, "removes collapse (v1: > 1M tokens)"
                          if key != "none" else "collapses if T_train < T_forget")
                         for key, v in data["mitigations"].items()], mitigation_lengths)
    with_passkey = [(t, data["trained"][str(t)]["passkey"]) for t in data["train_lengths"]
                    if "passkey" in data["trained"][str(t)]]
    if with_passkey:
        p0 = with_passkey[0][1]
        lines += ["", f"Passkey accuracy (mean over depths {p0['depths']}; "
                  f"{p0['prompts_per_cell']} prompts per cell over seeds and trials) by prompt "
                  "length. Paper, Fig. 2 (official Mamba-2, trained at 8K; read off the "
                  "heatmaps): 130M fails beyond a few K tokens, 370M holds to about 8-16K, "
                  "780M and 1.3B are near-perfect to about 10K and fail past it.", "",
                  "| trained at | " + " | ".join(f"{x} bytes" for x in p0["lengths"]) + " |",
                  "|---|" + "---|" * len(p0["lengths"])]
        for t, p in with_passkey:
            means = np.asarray(p["accuracy"]).mean(axis=0)
            lines.append(f"| {t} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    if preset == "paper":
        lines += ["", PAPER_ESTIMATE]
    return "\n".join(lines)
