"""Figure 6 — masks and block sparsity (no training).

(a) LM-Infinite's Fig. 2(a) as a grid: a small Λ-mask (``Lambda(window, n_global)`` with
distance limit ``D``) over ``T`` positions, each visible ``(query i, key j)`` pair coloured by
the *effective distance* its score sees, ``i - j`` inside the window and ``D`` on the sink
columns beyond it (``AttentionSpec.branches``: the query is rotated at ``D``, the key at 0);
invisible pairs are blank. With ``D <= window`` (the paper's ``D = window = L_pretrain``) this
is the paper's ``min(i - j, D)``.

(b) The EMPTY / PARTIAL / FULL tile classes ``pallas_kernels.block_sparse.tile_classes`` gives
the kernels for Causal, Local(4096) and Lambda(4096, 64) at 8k, 32k and 128k tokens; the
kernels visit only the non-empty tiles (``block_lists``). Panels are drawn with ``T / 64``
tiles (64 x 64 per panel, readable at any length); the table counts the kernels' 128 x 128
tiles.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from lcattn import masks
from lcattn.attention import AttentionSpec
from pallas_kernels import block_sparse
from pallas_kernels.protocols import EMPTY, FULL, PARTIAL

NAME = "mask_sparsity"
TITLE = "Masks and block sparsity: Λ-mask effective distances, visited tiles"
PAPER = ("Han et al., LM-Infinite (NAACL 2024), Fig. 2(a): a diagram of the Λ-shaped mask "
         "with the distance limit, no numbers. The tile counts are ours (what the block-sparse "
         "kernels of pallas_kernels visit); the paper reports none")

# No training: every preset draws the same masks (each costs seconds on a CPU).
_SIZES = {"grid_length": 32, "grid_window": 8, "grid_n_global": 2, "grid_distance_limit": 8,
          "lengths": (8192, 32768, 131072), "block": 128, "drawn_tiles": 64}
SIZES = {"smoke": _SIZES, "quick": _SIZES, "paper": _SIZES}
MASKS = {"Causal": masks.Causal(), "Local(4096)": masks.Local(4096),
         "Lambda(4096, 64)": masks.Lambda(4096, 64)}
CLASS_COLOURS = {EMPTY: "white", PARTIAL: "tab:orange", FULL: "tab:blue"}


def effective_distance(spec: AttentionSpec, length: int) -> np.ndarray:
    """``float [T, T]``: for query ``i`` (row) and key ``j`` (column) at positions ``0..T-1``,
    the distance ``q_enc - k_enc`` at which ``spec`` scores the pair, NaN where it is invisible.

    One value per branch of ``spec.branches``: ``i - j`` without a distance limit; with
    ``distance_limit=D`` (LM-Infinite), ``i - j`` for ``i - j < window`` and ``D`` for the
    visible pairs beyond the window (the sinks).
    """
    q = np.arange(length)[:, None]
    k = np.arange(length)[None, :]
    out = np.full((length, length), np.nan)
    for mask, q_enc, k_enc in spec.branches(q, k):
        visible = np.asarray(mask(q, k), bool)
        dist = np.broadcast_to(np.asarray(q_enc) - np.asarray(k_enc), out.shape)
        out = np.where(visible, dist, out)
    return out


def tile_map(mask: masks.Mask, length: int, block: int) -> np.ndarray:
    """``int8 [T/block, T/block]`` EMPTY/PARTIAL/FULL classes of ``mask`` over positions
    ``0..T-1`` cut into ``block x block`` tiles (the kernels' metadata, ``tile_classes``)."""
    pos = np.arange(length)[None, :]
    return block_sparse.tile_classes(mask, pos, pos, block, block)


def tile_counts(classes: np.ndarray) -> dict:
    """``{total, visited, full, partial}`` of a ``[nq, nk]`` tile-class map; ``visited``: the
    non-empty tiles the kernels walk (``block_lists(...).kv_count`` summed over rows)."""
    visited = int(block_sparse.block_lists(classes).kv_count.sum())
    return {"total": int(classes.size), "visited": visited,
            "full": int((classes == FULL).sum()), "partial": int((classes == PARTIAL).sum())}


def compute(pool, preset: str) -> dict:
    del pool  # no runs: masks only
    s = SIZES[preset]
    spec = AttentionSpec(mask=masks.Lambda(s["grid_window"], s["grid_n_global"]),
                         distance_limit=s["grid_distance_limit"])
    grid = effective_distance(spec, s["grid_length"])
    out = {"grid": {"length": s["grid_length"], "window": s["grid_window"],
                    "n_global": s["grid_n_global"], "distance_limit": s["grid_distance_limit"],
                    "distance": np.where(np.isnan(grid), -1, grid).astype(int).tolist()},
           "block": s["block"], "lengths": list(s["lengths"]), "masks": {}}
    for name, mask in MASKS.items():
        per = out["masks"][name] = {}
        for length in s["lengths"]:
            drawn_block = max(s["block"], length // s["drawn_tiles"])
            drawn = tile_map(mask, length, drawn_block)
            per[str(length)] = {"counts": tile_counts(tile_map(mask, length, s["block"])),
                                "drawn_block": drawn_block, "drawn_classes": drawn.tolist(),
                                "drawn_counts": tile_counts(drawn)}
    return out


def _draw_grid(ax, g: dict) -> None:
    dist = np.asarray(g["distance"], float)
    dist[dist < 0] = np.nan
    t, d = g["length"], g["distance_limit"]
    im = ax.imshow(dist, cmap="viridis", vmin=0, vmax=max(d, g["window"] - 1),
                   interpolation="nearest")
    for i, j in zip(*np.nonzero(np.isfinite(dist))):
        value = int(dist[i, j])
        ax.text(j, i, str(value), ha="center", va="center", fontsize=4.2,
                color="black" if value > 0.6 * d else "white")
    ax.set_xticks(range(0, t, 4))
    ax.set_yticks(range(0, t, 4))
    ax.tick_params(labelsize=7)
    ax.set(xlabel="key position j", ylabel="query position i",
           title=f"(a) Λ-mask T={t}, window={g['window']}, n_global={g['n_global']}, "
                 f"D={d}\neffective distance (blank: invisible)")
    ax.title.set_fontsize(9)
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)


def draw(data: dict, preset: str):
    lengths, names = data["lengths"], list(data["masks"])
    fig = plt.figure(figsize=(13, 6.2))
    grid = fig.add_gridspec(len(names), 1 + len(lengths), width_ratios=[2.6] + [1] * len(lengths),
                            left=0.05, right=0.99, top=0.9, bottom=0.1, wspace=0.25,
                            hspace=0.35)
    _draw_grid(fig.add_subplot(grid[:, 0]), data["grid"])
    cmap = ListedColormap([CLASS_COLOURS[c] for c in (EMPTY, PARTIAL, FULL)])
    for r, name in enumerate(names):
        for c, length in enumerate(lengths):
            v = data["masks"][name][str(length)]
            ax = fig.add_subplot(grid[r, 1 + c])
            ax.imshow(np.asarray(v["drawn_classes"]), cmap=cmap, vmin=0, vmax=2,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("0.6")
            k = data["masks"][name][str(length)]["counts"]
            ax.set_title(f"{name}, T={length // 1024}k\nvisited {k['visited'] / k['total']:.1%}"
                         f" of 128² tiles", fontsize=8)
            ax.set_xlabel(f"drawn with {v['drawn_block']}² tiles", fontsize=6.5, labelpad=2)
    fig.legend(handles=[Patch(facecolor=CLASS_COLOURS[c], edgecolor="0.5", label=label)
                        for c, label in ((EMPTY, "EMPTY (skipped)"), (PARTIAL, "PARTIAL"),
                                         (FULL, "FULL (no mask evaluation)"))],
               loc="lower right", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.99, 0.01))
    fig.suptitle("(b) tile classes drawn with T/64 tiles (64×64 per panel); counts: "
                 f"{data['block']}×{data['block']} kernel tiles", x=0.66, y=0.975, fontsize=9)
    return fig


def table(data: dict, preset: str) -> str:
    b = data["block"]
    lines = [f"Tiles of {b}×{b} positions over T×T (T a multiple of {b}): tiles the "
             "block-sparse kernels visit (non-empty), of them FULL (no mask evaluation), the "
             "fraction of all tiles, and the ratio to Causal at the same T. LM-Infinite's "
             "Fig. 2(a) is a diagram (no numbers); panel (a) draws it for "
             f"T={data['grid']['length']}.", "",
             "| mask | T | tiles | visited | FULL | PARTIAL | visited / tiles | visited / Causal |",
             "|---|---|---|---|---|---|---|---|"]
    for length in data["lengths"]:
        causal = data["masks"]["Causal"][str(length)]["counts"]["visited"]
        for name, per in data["masks"].items():
            k = per[str(length)]["counts"]
            lines.append(f"| {name} | {length} | {k['total']} | {k['visited']} | {k['full']} | "
                         f"{k['partial']} | {k['visited'] / k['total']:.4f} | "
                         f"{k['visited'] / causal:.4f} |")
    return "\n".join(lines)
