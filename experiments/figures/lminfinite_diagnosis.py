"""Figure 2 — LM-Infinite's diagnosis (its Fig. 1): why softmax + RoPE fails past its length.

The softmax + RoPE model trained at length ``L`` (``common.SOFTMAX_ROPE``) reads ``S``
validation sequences of ``T = 16 L`` tokens (the held-out text concatenated and cut from its
start, as ``experiments.evaluate`` does). For every attention layer, query ``i`` and key
``j <= i`` at distance ``d = i - j``:

* logit ``s_h(i, j) = R(i) q_h(i) · R(j) k_h(j) / sqrt(d_head)`` (RoPE ``R``, before softmax),
  maximized over heads: ``m(i, j) = max_h s_h(i, j)``;
* (a) per query row the running maximum over distance, ``M_i(d) = max_{d' <= d} m(i, i - d')``
  (rows with ``i >= d``), mean ± std over rows, sequences and seeds, per layer;
* (b) attention entropy ``H_i = -sum_j p_h(i, j) log p_h(i, j)`` (mean over heads) against the
  query position ``i``; ``log(i + 1)`` is its maximum (uniform over the visible keys);
* (c) PCA (SVD of the centred states) of the last layer's hidden states (the residual stream
  after the last block, before the final norm) of seed 0's sequences, the first ``FIRST``
  positions of every sequence marked apart from the rest.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from matplotlib.colors import LogNorm

from experiments.figures import common
from experiments.figures.lminfinite_nll import log_bins

NAME = "lminfinite_diagnosis"
TITLE = "LM-Infinite's diagnosis: logits, entropy and initial-token states past the train length"
PAPER = ("Han et al., LM-Infinite (NAACL 2024), Fig. 1, qualitative (no table): for Llama-2 "
         "(trained at 4k) (a) the attention logits explode at distances past the training "
         "length, (b) the attention entropy keeps increasing with the context length, (c) the "
         "hidden states of the initial few tokens occupy a distinct region of the last layer's "
         "PCA plane")
MULTIPLIER = 16  # evaluation length T = MULTIPLIER x the train length
FIRST = 10  # "initial tokens": the n_global of configs/attention/lminfinite.gin
# sequences: S sequences of T tokens per seed; chunk: query rows per logits block
# ([S, heads, chunk, T] floats); max_points: PCA points drawn besides the first tokens.
SIZES = {"smoke": {"sequences": 2, "chunk": 128, "max_points": 2000},
         "quick": {"sequences": 4, "chunk": 256, "max_points": 3000},
         "paper": {"sequences": 4, "chunk": 64, "max_points": 3000}}
CAVEATS = {"smoke": "smoke preset: a model trained for 6 steps; these numbers mean nothing.",
           "quick": "quick preset (2-layer tiny model): (a) and (b) show the paper's trends, (c) "
                    "does not: the first tokens' last-layer states lie inside the others' cloud "
                    "(separation < 1 in the table)."}


def entropy(p, axis: int = -1):
    """``-sum p log p`` of probabilities ``p`` along ``axis`` (``0 log 0 = 0``), in nats."""
    p = jnp.asarray(p, jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def running_max(x, axis: int = -1):
    """Cumulative maximum along ``axis`` (``-inf`` entries are ignored until a finite one); an
    associative scan, ``O(n log n)`` on every platform."""
    return jax.lax.associative_scan(jnp.maximum, jnp.asarray(x), axis=axis % jnp.ndim(x))


def by_distance(m, rows):
    """``m [C, T]`` (query row ``r`` at position ``rows[r]``, key ``j``) re-indexed by distance:
    ``out[r, d] = m[r, rows[r] - d]`` for ``d <= rows[r]``, ``-inf`` beyond."""
    m = jnp.asarray(m, jnp.float32)
    d = jnp.arange(m.shape[-1])
    j = jnp.asarray(rows)[:, None] - d[None, :]
    picked = jnp.take_along_axis(m, jnp.maximum(j, 0), axis=-1)
    return jnp.where(j >= 0, picked, -jnp.inf)


def pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of ``x [N, D]`` by SVD of the centred data: ``(scores [N, k], components [k, D],
    explained variance ratio [k])``, components ordered by variance (sign: largest |entry|
    positive)."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(axis=0)
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:k] * np.sign(vt[:k][np.arange(min(k, len(vt))),
                                    np.abs(vt[:k]).argmax(axis=1)])[:, None]
    ratio = sing[:k] ** 2 / max(float((sing ** 2).sum()), 1e-300)
    return centred @ comps.T, comps, ratio


def centroid_separation(points: np.ndarray, first: np.ndarray) -> float:
    """``|mean(first) - mean(rest)| / sqrt(mean_rest |p - mean(rest)|^2)``: how far the
    ``first`` points' centroid sits from the rest's, in units of the rest's RMS spread
    (``points [N, D]``, ``first`` bool ``[N]``)."""
    points = np.asarray(points, np.float64)
    rest = points[~first]
    centre = rest.mean(axis=0)
    spread = np.sqrt(((rest - centre) ** 2).sum(axis=1).mean())
    return float(np.linalg.norm(points[first].mean(axis=0) - centre) / spread)


def octave_mean(sums, counts, end: int) -> float:
    """``sum(sums[end//2:end]) / sum(counts[end//2:end])``: the mean over the octave of
    positions (or distances) before ``end``."""
    lo = end // 2
    return float(np.sum(np.asarray(sums)[lo:end]) / max(np.sum(np.asarray(counts)[lo:end]), 1))


@nnx.jit
def _trace(model, tokens):
    """``tokens [S, T]`` -> (per attention layer ``(q, k)``: rotated, ``q`` scaled by the
    softmax scale, ``[S, T, H, Dh]`` / ``[S, T, Hkv, Dh]``; hidden ``[S, T, D]`` after the last
    block)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x, qk = model.embed(tokens), []
    for block in model.blocks:
        if block.attention:
            h, att = block.mixer_norm(x), block.mixer
            q, k = (jnp.einsum("btd,dhk->bthk", h, w[...].astype(h.dtype))
                    for w in (att.wq, att.wk))
            spec = att.spec
            qk.append(spec.normalizer.prepare(spec.position.rotate(q, positions),
                                              spec.position.rotate(k, positions)))
        x = block(x, positions=positions, segment_ids=None, override=None, backend=None,
                  context_layout="contiguous")
    return qk, x


def _sequence_stats(q, k, rows, mask, normalizer, train_length):
    """One sequence's query rows ``rows [C]`` (``q [C, H, Dh]``) against its keys
    ``k [T, Hkv, Dh]``; see ``_row_stats``."""
    k = jnp.repeat(k, q.shape[1] // k.shape[1], axis=1)
    s = jnp.einsum("chd,thd->hct", q, k, preferred_element_type=jnp.float32)
    cols = jnp.arange(k.shape[0])
    visible = mask(rows[:, None], cols[None, :])
    s = jnp.where(visible, s, -jnp.inf)
    m = s.max(axis=0)
    at = by_distance(m, rows)
    run = running_max(at)
    valid = (cols[None, :] <= rows[:, None]) & jnp.isfinite(run)
    run0 = jnp.where(valid, run, 0.0)
    p = jax.nn.softmax(jnp.where(visible, normalizer.log_weight(s), -jnp.inf), axis=-1)
    dist = rows[:, None] - cols[None, :]
    near = jnp.max(jnp.where(visible & (dist < train_length), m, -jnp.inf))
    far = jnp.max(jnp.where(visible & (dist >= train_length), m, -jnp.inf))
    return (run0.sum(0), (run0 ** 2).sum(0), valid.sum(0),
            jnp.where(jnp.isfinite(at), at, 0.0).sum(0), jnp.isfinite(at).sum(0),
            entropy(p).mean(axis=0), near, far)


@functools.partial(jax.jit, static_argnames=("mask", "normalizer", "train_length"))
def _row_stats(q, k, rows, *, mask, normalizer, train_length):
    """Query rows ``rows [C]`` (``q [S, C, H, Dh]``) against all keys ``k [S, T, Hkv, Dh]``:
    summed over the ``S`` sequences, per distance ``d`` the sum, sum of squares and count of
    the rows' running max ``M_i(d)`` and the sum and count of ``m(i, i - d)`` (``[T]`` each);
    the entropy ``[S, C]`` (mean over heads); the largest logit at distances
    ``< train_length`` and ``>= train_length``."""
    out = jax.vmap(lambda q, k: _sequence_stats(q, k, rows, mask, normalizer, train_length))(
        q, k)
    sums = tuple(x.sum(axis=0) for x in out[:5])
    return sums + (out[5], out[6].max(), out[7].max())


def analyse(model, tokens: np.ndarray, train_length: int, chunk: int) -> dict:
    """For ``tokens [S, T]``, per attention layer: running-max sums ``[T]`` (``sum``,
    ``sumsq``, ``count``), sums of the logit at each distance (``at_sum``, ``at_count``),
    entropy ``[S, T]``, largest logit within / past ``train_length``; and the hidden states
    ``[S, T, D]`` after the last block."""
    qk, hidden = _trace(model, jnp.asarray(tokens))
    specs = [block.mixer.spec for block in model.blocks if block.attention]
    s_count, t = tokens.shape
    layers = []
    for (q, k), spec in zip(qk, specs):
        acc = {"sum": 0.0, "sumsq": 0.0, "count": 0, "at_sum": 0.0, "at_count": 0,
               "entropy": np.zeros((s_count, t)), "max_within": -np.inf, "max_past": -np.inf}
        for lo in range(0, t, chunk):
            rows = jnp.arange(lo, min(lo + chunk, t))
            out = _row_stats(q[:, lo:lo + chunk], k, rows, mask=spec.mask,
                             normalizer=spec.normalizer, train_length=train_length)
            for i, key in enumerate(("sum", "sumsq", "count", "at_sum", "at_count")):
                acc[key] = acc[key] + np.asarray(out[i], np.float64)
            acc["entropy"][:, lo:lo + chunk] = np.asarray(out[5])
            acc["max_within"] = max(acc["max_within"], float(out[6]))
            acc["max_past"] = max(acc["max_past"], float(out[7]))
        layers.append(acc)
    return {"layers": layers, "hidden": np.asarray(hidden)}


def _load(folder: str):
    from experiments import configurables
    from experiments.evaluate import restore_model

    configurables.parse([], [], run_config=os.path.join(folder, "config.gin"))
    model, _ = restore_model(folder)
    return model


def _validation(num: int, length: int) -> np.ndarray:
    from experiments.data import DataConfig, validation_documents

    tokens = np.concatenate(validation_documents(DataConfig()))
    if len(tokens) < num * length:
        raise ValueError(f"{NAME}: validation text has {len(tokens)} tokens, fewer than "
                         f"{num} x {length}")
    return tokens[:num * length].reshape(num, length)


def compute(pool, preset: str) -> dict:
    size = SIZES[preset]
    seeds = list(pool.scale.seeds)
    train_length = pool.evaluation(common.SOFTMAX_ROPE, seeds[0])["length_unit"]
    t = MULTIPLIER * train_length
    tokens = _validation(size["sequences"], t)
    first = np.arange(t) < FIRST
    sums, entropies, per_seed, pca_data = None, [], [], None
    for seed in seeds:
        result = analyse(_load(pool.ensure(common.SOFTMAX_ROPE, seed)), tokens, train_length,
                         size["chunk"])
        layers = result["layers"]
        if sums is None:
            sums = [{k: 0.0 for k in ("sum", "sumsq", "count", "at_sum", "at_count")}
                    for _ in layers]
        record = {"layers": []}
        for acc, total in zip(layers, sums):
            for key in total:
                total[key] = total[key] + acc[key]
            mean = acc["sum"] / np.maximum(acc["count"], 1)
            ent = acc["entropy"].mean(axis=0)
            record["layers"].append({
                "max_within": acc["max_within"], "max_past": acc["max_past"],
                "running_max_at_L": float(mean[train_length - 1]),
                "running_max_at_T": float(mean[t - 1]),
                "logit_1x": octave_mean(acc["at_sum"], acc["at_count"], train_length),
                "logit_16x": octave_mean(acc["at_sum"], acc["at_count"], t),
                "entropy_1x": octave_mean(ent, np.ones(t), train_length),
                "entropy_16x": octave_mean(ent, np.ones(t), t)})
        entropies.append(np.stack([acc["entropy"] for acc in layers]))  # [layers, S, T]
        hidden = result["hidden"].reshape(-1, result["hidden"].shape[-1])
        is_first = np.tile(first, size["sequences"])
        scores, _, ratio = pca(hidden, 2)
        record["separation_pca"] = centroid_separation(scores, is_first)
        record["separation_full"] = centroid_separation(hidden, is_first)
        record["explained"] = ratio.tolist()
        per_seed.append(record)
        if pca_data is None:  # seed 0's plane: every first token, evenly strided others
            rest = np.flatnonzero(~is_first)
            keep = np.concatenate([np.flatnonzero(is_first),
                                   rest[:: max(1, len(rest) // size["max_points"])]])
            pca_data = {"x": scores[keep, 0].round(4).tolist(),
                        "y": scores[keep, 1].round(4).tolist(),
                        "position": np.tile(np.arange(t), size["sequences"])[keep].tolist(),
                        "explained": ratio.tolist(), "seed": seed}
    ent = np.concatenate(entropies, axis=1)  # [layers, seeds * S, T]
    out = {"train_length": train_length, "length": t, "sequences": size["sequences"],
           "first": FIRST, "layers": [], "per_seed": per_seed, "pca": pca_data}
    for layer, total in enumerate(sums):
        count = np.maximum(total["count"], 1)
        mean = total["sum"] / count
        std = np.sqrt(np.maximum(total["sumsq"] / count - mean ** 2, 0.0))
        d, m = log_bins(mean)
        _, sd = log_bins(std)
        _, at = log_bins(total["at_sum"] / np.maximum(total["at_count"], 1))
        positions, e_mean = log_bins(ent[layer].mean(axis=0))
        _, e_std = log_bins(ent[layer].std(axis=0))
        out["layers"].append({"distance": d.tolist(), "running_max_mean": m.tolist(),
                              "running_max_std": sd.tolist(), "logit_mean": at.tolist(),
                              "position": positions.tolist(),
                              "entropy_mean": e_mean.tolist(), "entropy_std": e_std.tolist()})
    return out


def draw(data: dict, preset: str):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    length, train = data["length"], data["train_length"]
    for i, layer in enumerate(data["layers"]):
        labels = (f"layer {i}: running max M(d)", f"layer {i}")
        axes[0].plot(layer["distance"], layer["logit_mean"], lw=0.9, ls="--", color=f"C{i}",
                     label=f"layer {i}: mean m at d")
        for ax, label, x, m, s in (
                (axes[0], labels[0], "distance", "running_max_mean", "running_max_std"),
                (axes[1], labels[1], "position", "entropy_mean", "entropy_std")):
            x, m, s = (np.asarray(layer[key]) for key in (x, m, s))
            ax.plot(x, m, lw=1.4, label=label, color=f"C{i}")
            ax.fill_between(x, m - s, m + s, alpha=0.2, color=f"C{i}")
    x = np.geomspace(1, length, 64)
    axes[1].plot(x, np.log(x + 1), ls=":", color="gray", lw=1, label="log(i+1): uniform")
    for ax in axes[:2]:
        ax.axvline(train, ls="--", color="gray", lw=1)
        ax.text(train, 0.02, " train length", transform=ax.get_xaxis_transform(), fontsize=8,
                color="gray")
        ax.set_xscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.3 * (high - low))  # room for the legend
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    axes[0].set(xlabel="distance d = i − j", ylabel="logit m, max over heads",
                title=f"(a) max logit vs distance, mean ± std over rows (T={length})")
    axes[1].set(xlabel="query position i (context length)", ylabel="attention entropy (nats)",
                title="(b) attention entropy, mean over heads")
    p = data["pca"]
    x, y, pos = (np.asarray(p[key]) for key in ("x", "y", "position"))
    rest, first = pos >= data["first"], pos < data["first"]
    sc = axes[2].scatter(x[rest], y[rest], c=pos[rest], s=3, cmap="viridis",
                         norm=LogNorm(data["first"], length), alpha=0.6, linewidths=0)
    axes[2].scatter(x[first], y[first], s=22, color="red", edgecolors="black", linewidths=0.4,
                    label=f"positions < {data['first']}")
    axes[2].scatter(x[pos == 0], y[pos == 0], s=70, marker="*", color="black",
                    label="position 0")
    plt.colorbar(sc, ax=axes[2], fraction=0.046, pad=0.02, label="position")
    ev = p["explained"]
    axes[2].set(xlabel=f"PC1 ({ev[0]:.0%} of variance)", ylabel=f"PC2 ({ev[1]:.0%})",
                title=f"(c) last layer's hidden states, PCA (seed {p['seed']})")
    axes[2].legend(fontsize=8, loc="best")
    for ax in axes:
        ax.title.set_fontsize(10)
    fig.suptitle(f"softmax + RoPE trained at L={train}, read at {length // train}L ({preset})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def table(data: dict, preset: str) -> str:
    seeds, train, t = data["per_seed"], data["train_length"], data["length"]
    times = t // train

    def col(layer, key):
        return common.fmt([s["layers"][layer][key] for s in seeds], 2)

    lines = [f"Softmax + RoPE trained at L={train}, {data['sequences']} validation sequences of "
             f"T={t} per seed; mean ± std over seeds. m(i, j): the logit q·k/sqrt(d) after "
             "RoPE, max over heads. Largest m at distances d < L and L ≤ d < T; M(d): running "
             "max of m over distances ≤ d, mean over query rows; mean m over the distance octave "
             f"[L/2, L) (1×) and [T/2, T) ({times}×); entropy (mean over heads) over the query "
             f"positions [L/2, L) and [T/2, T) (uniform attention: log i, log L = "
             f"{np.log(train):.2f}, log T = {np.log(t):.2f}).", "",
             "| layer | max m, d < L | max m, L ≤ d < T | M(L−1) | M(T−1) | mean m 1× | "
             f"mean m {times}× | entropy 1× | entropy {times}× |", "|---|" + "---|" * 8]
    for layer in range(len(data["layers"])):
        lines.append(f"| {layer} | " + " | ".join(
            col(layer, key) for key in ("max_within", "max_past", "running_max_at_L",
                                        "running_max_at_T", "logit_1x", "logit_16x",
                                        "entropy_1x", "entropy_16x")) + " |")
    lines += ["| paper (Llama-2, qualitative) | — | explodes | — | explodes | — | — | — | "
              "keeps rising |"]
    sep = [s["separation_pca"] for s in seeds]
    full = [s["separation_full"] for s in seeds]
    lines += ["", f"Initial tokens (positions < {data['first']}) against the rest in the last "
              "layer's hidden states: distance between the centroids in units of the rest's RMS "
              "spread around its centroid (1 ≈ a typical token's distance).", "",
              "| space | separation | paper (Llama-2) |", "|---|---|---|",
              f"| PCA plane (PC1, PC2) | {common.fmt(sep, 2)} | a distinct region |",
              f"| full hidden space | {common.fmt(full, 2)} | — |"]
    return "\n".join(lines)
