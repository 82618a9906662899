"""Figure 5 — HMT: validation loss against the number of segments a model reads.

He et al. (2024, arXiv 2405.06067) wrap a backbone whose context is one segment of ``L``
tokens in a segment recurrence (``lcattn.memory``: summary prompt, recall by cross-attention
over a FIFO cache of memory embeddings, sensory memory of the last ``k`` tokens) and report
that the memory lowers the loss of the segment-limited backbone on long inputs. The three
variants of ``configs/sweeps/hmt_quick.gin``, trained on the same chunked rows of
``segments_per_row`` segments with the same tiny softmax + RoPE backbone:

* ``segment_only``: the backbone alone on each segment (HMT with no memory, no sensory
  tokens, no recall: every segment starts from nothing);
* ``sliding_window``: the backbone with ``Local(L)`` attention over the whole input;
* ``hmt``: the backbone inside HMT (``configs/memory/hmt.gin``).

Panels: (a) loss against the number of segments ``n`` (eval length ``n·L``, ``n`` in
``multipliers``), mean ± std over seeds; (b) where carried context helps: ``within_segment``
(NLL by position inside a segment, averaged over segments 2..n of the longest input) in the
power-of-two position bins of ``position_bins``, minus ``segment_only``'s, per seed, then
mean ± std.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from experiments.figures import common
from experiments.figures.runs import Run
from experiments.figures.state_collapse import band

NAME = "hmt_segments"
TITLE = "HMT: loss vs number of segments (backbone on one segment, sliding window, HMT)"
PAPER = ("He et al., HMT (arXiv 2405.06067, NAACL 2025): HMT around a backbone limited to one "
         "segment lowers its perplexity on long inputs (Wikitext-103, PG-19; OPT, OpenLlama, "
         "Llama-2 and other backbones) and beats flat-memory recurrence (RMT). No number of the "
         "paper is quoted here: we could not verify one for this exact comparison")
PAPER_SHAPE = {"segment_only": "flat, the highest (no context past one segment)",
               "sliding_window": "not in the paper's comparison",
               "hmt": "below the backbone, improving with more segments"}

ATTENTION = "configs/attention/"
HMT = "configs/memory/hmt.gin"
NO_MEMORY = ("memory.HMTConfig.sensory_len = 0", "memory.HMTConfig.num_memories = 0",
             "memory.HMTConfig.recall = False")
# name -> (gin files, bindings), as the variants of configs/sweeps/hmt_quick.gin
VARIANTS = {
    "segment_only": ((ATTENTION + "softmax_rope.gin", HMT), NO_MEMORY),
    "sliding_window": ((ATTENTION + "sliding_window.gin",), ()),
    "hmt": ((ATTENTION + "softmax_rope.gin", HMT), ()),
}
# Per preset: segment length L, segments per training row, batch, steps, segment counts of the
# evaluation, how many sequences of the longest eval length the validation text is cut into
# (``k·T_max + 1`` tokens: every eval length reads the same text), how many of the scale's
# seeds (None: all), extra gin files / bindings.
SIZES = {
    "smoke": dict(segment=32, segments_per_row=4, batch=2, steps=6, multipliers=(1, 4),
                  eval_sequences=4, num_seeds=None, gin=(), bindings=()),
    "quick": dict(segment=64, segments_per_row=4, batch=4, steps=100,
                  multipliers=(1, 2, 4, 8, 16), eval_sequences=8, num_seeds=2, gin=(),
                  bindings=()),
    # small.gin backbone (4 layers, d_model 256; 3.35M parameters with HMT), 256-token
    # segments, rows of 4 segments. Unmeasured (no GPU here): see PAPER_ESTIMATE.
    "paper": dict(segment=256, segments_per_row=4, batch=32, steps=1000,
                  multipliers=(1, 2, 4, 8, 16), eval_sequences=8, num_seeds=2,
                  gin=("configs/models/small.gin",),
                  bindings=("train.learning_rate = 1e-3", "train.warmup_steps = 100")),
}
CAVEATS = {
    "smoke": "Smoke preset: 6 training steps, one seed; it tests the code path and its numbers "
             "mean nothing.",
    "quick": "No gain from HMT at this scale: a 2-layer backbone trained 100 steps on 64-byte "
             "segments. HMT's loss falls a little with more segments, but the backbone alone "
             "on each segment is lower on average at every count; carried context (HMT, "
             "sliding window) helps only the first position of a segment (panel b) and costs "
             "slightly elsewhere, and the spread over seeds is larger than the differences.",
}
PAPER_ESTIMATE = ("Paper preset, estimated, not measured (no GPU was available): 6 trainings "
                  "(3 variants x 2 seeds) of a 3.35M-parameter backbone, 1,000 steps of 32 x "
                  "1,024 tokens (33M tokens each): ~35 s of steps (latency-bound, ~0.035 s per "
                  "step through the 4-segment recurrence) plus ~30 s of compilation and ~10 s "
                  "of evaluation each: 6-8 minutes in all on one H100/H200; a few GB of GPU "
                  "memory.")


def runs(preset: str) -> dict[str, Run]:
    """Variant name -> the Run of ``preset`` (names prefixed ``hmt_``)."""
    size = SIZES[preset]
    common_bindings = tuple(size["bindings"]) + (
        f"SEQ_LEN = {size['segment']}",
        f"train.seq_len = {size['segment'] * size['segments_per_row']}",
        f"train.batch_size = {size['batch']}", f"train.num_steps = {size['steps']}",
        f"train.checkpoint_every = {size['steps']}", "data.DataConfig.packing = 'chunk'",
        f"evaluate.length_unit = {size['segment']}",
        f"evaluate.length_multipliers = {tuple(size['multipliers'])}",
        f"evaluate.max_tokens = "
        f"{size['eval_sequences'] * size['segment'] * max(size['multipliers']) + 1}",
        "tasks.Passkey.trials = 0")
    return {name: Run(f"hmt_{name}", gin=tuple(size["gin"]) + gin,
                      bindings=common_bindings + bindings)
            for name, (gin, bindings) in VARIANTS.items()}


def within_segment(curve: np.ndarray, segment_len: int) -> np.ndarray:
    """Per-position NLL ``curve`` ``[n·L]`` folded into segments ``[n, L]`` and averaged over
    segments ``2..n`` (the first segment has no carried context): ``[L]``."""
    curve = np.asarray(curve, float)
    n = len(curve) // segment_len
    if n < 2:
        raise ValueError(f"within_segment: need at least 2 segments of {segment_len}, got "
                         f"{len(curve)} positions")
    return curve[:n * segment_len].reshape(n, segment_len)[1:].mean(axis=0)


def position_bins(segment_len: int) -> list[int]:
    """Edges ``[0, 1, 2, 4, ..., segment_len]`` of the power-of-two bins of positions inside a
    segment (bin ``i`` holds positions ``[edges[i], edges[i+1])``)."""
    edges = [0] + [2 ** i for i in range(int(np.log2(segment_len)) + 1) if 2 ** i < segment_len]
    return edges + [segment_len]


def bin_means(curve: np.ndarray, edges) -> np.ndarray:
    """Mean of ``curve`` ``[L]`` over each bin ``[edges[i], edges[i+1])``: ``[len(edges) - 1]``."""
    curve = np.asarray(curve, float)
    return np.array([curve[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])


def compute(pool, preset: str) -> dict:
    size = SIZES[preset]
    n = size["num_seeds"]
    seeds = list(pool.scale.seeds if n is None else pool.scale.seeds[:n])
    edges = position_bins(size["segment"])
    out = {"seeds": seeds, "scale_seeds": list(pool.scale.seeds),
           "segment": size["segment"], "segments": list(size["multipliers"]),
           "bin_edges": edges, "variants": {}}
    binned = {}
    for name, run in runs(preset).items():
        losses, binned[name] = [], []
        for seed in seeds:
            ev = pool.evaluation(run, seed)
            losses.append([ev["loss"][str(size["segment"] * m)] for m in size["multipliers"]])
            nll = pool.nll_by_position(run, seed)[-1]
            inside = within_segment(nll[np.isfinite(nll)], size["segment"])
            binned[name].append(bin_means(inside, edges))
        out["variants"][name] = {"loss": band(losses), "loss_by_seed": losses,
                                 "inside_by_seed": np.asarray(binned[name]).tolist()}
    for name, v in out["variants"].items():
        v["inside_minus_segment_only"] = band(np.asarray(binned[name])
                                              - np.asarray(binned["segment_only"]))
    return out


def _bin_labels(edges) -> list[str]:
    return [str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]


def draw(data: dict, preset: str):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3))
    segments = np.asarray(data["segments"])
    labels = _bin_labels(data["bin_edges"])
    for i, (name, v) in enumerate(data["variants"].items()):
        m, s = np.asarray(v["loss"]["mean"]), np.asarray(v["loss"]["std"])
        ax.plot(segments, m, "o-", ms=4, color=f"C{i}", label=name)
        ax.fill_between(segments, m - s, m + s, alpha=0.2, color=f"C{i}")
        d = v["inside_minus_segment_only"]
        m, s = np.asarray(d["mean"]), np.asarray(d["std"])
        x = np.arange(len(m))
        bx.plot(x, m, "o-", ms=4, color=f"C{i}", label=name)
        bx.fill_between(x, m - s, m + s, alpha=0.2, color=f"C{i}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(segments, [str(x) for x in segments])
    ax.minorticks_off()
    ax.set(xlabel=f"segments of {data['segment']} bytes read",
           ylabel="validation loss (nats/byte)", title="(a) loss vs number of segments")
    ax.legend(fontsize=8)
    bx.axhline(0, color="gray", lw=0.8)
    bx.set_xticks(range(len(labels)), labels, fontsize=8)
    bx.set(xlabel="position inside the segment",
           ylabel="NLL − segment_only's (nats/byte)",
           title=f"(b) inside segments 2-{max(data['segments'])}: gain from carried context")
    bx.legend(fontsize=8)
    fig.suptitle(f"HMT vs segment-limited backbone ({preset}; seeds {data['seeds']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def table(data: dict, preset: str) -> str:
    segments = data["segments"]
    seeds = data["seeds"]
    note = ("" if seeds == data["scale_seeds"] else
            f" Seeds used: {seeds} of the preset's {data['scale_seeds']} (time budget).")
    lines = [f"Validation loss (nats/byte), mean ± std over seeds, by number of segments of "
             f"{data['segment']} bytes; last columns: loss at the most segments minus at one "
             f"segment (ours), and the paper's shape for this curve.{note}", "",
             "| variant | " + " | ".join(f"{n} seg." for n in segments)
             + " | most − one | paper |", "|---|" + "---|" * (len(segments) + 2)]
    for name, v in data["variants"].items():
        by_seed = np.asarray(v["loss_by_seed"])
        cells = [common.fmt(by_seed[:, j]) for j in range(len(segments))]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {common.fmt(by_seed[:, -1] - by_seed[:, 0])} | "
                     f"{PAPER_SHAPE[name]} |")
    labels = _bin_labels(data["bin_edges"])
    lines += ["", f"NLL by position inside a segment, segments 2-{max(segments)} of the longest "
              "input, mean ± std over seeds:", "",
              "| variant | " + " | ".join(f"pos. {x}" for x in labels) + " |",
              "|---|" + "---|" * len(labels)]
    for name, v in data["variants"].items():
        by_seed = np.asarray(v["inside_by_seed"])
        lines.append(f"| {name} | " + " | ".join(common.fmt(by_seed[:, j])
                                                 for j in range(len(labels))) + " |")
    if preset == "paper":
        lines += ["", PAPER_ESTIMATE]
    return "\n".join(lines)
