# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Masks and block sparsity
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lcattn/lcattn/blob/main/notebooks/01_masks_and_sparsity.ipynb)
#
# `lcattn.masks` are lazy objects over absolute positions: a mask evaluates elementwise on
# position arrays, counts the keys a query sees, and classifies a tile of positions as
# EMPTY / PARTIAL / FULL exactly, without a `T × T` array. This notebook draws a gallery of
# masks on a small grid, the tiles the block-sparse kernels visit at 8k–128k tokens (paper
# figure 6, `experiments.figures.mask_sparsity`), and lets you move the Λ-mask's window, sinks
# and distance limit with sliders (when `ipywidgets` is installed).

# %%
# Colab only: clone lcattn and install it. On a TPU or GPU runtime, first install the
# accelerator build of JAX in a cell of its own (`!pip install -U "jax[tpu]"` or
# `!pip install -U "jax[cuda12]"`), then run this cell. Elsewhere: `pip install -e .` in a clone.
import os
import subprocess
import sys

REPO_URL = "https://github.com/lcattn/lcattn"  # placeholder until the project is published
if "google.colab" in sys.modules:
    if not os.path.isdir("/content/lcattn"):
        subprocess.check_call(["git", "clone", "--depth=1", REPO_URL, "/content/lcattn"])
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e",
                               "/content/lcattn"])
    sys.path.insert(0, "/content/lcattn")  # the editable install is seen after a restart only
    os.chdir("/content/lcattn")

# %%
import jax

print("backend:", jax.default_backend())
print("devices:", jax.devices())

# %%
# Parameters. Nothing here trains: every preset draws the same masks in seconds.
from experiments import configurables

SMOKE = os.environ.get("LCATTN_SMOKE", "0") == "1"
ACCELERATOR = jax.default_backend() in ("tpu", "gpu")
PRESET = os.environ.get("LCATTN_PRESET") or ("smoke" if SMOKE else
                                             "paper" if ACCELERATOR else "quick")
WORKDIR = os.environ.get("LCATTN_WORKDIR") or os.path.join(configurables.REPO_ROOT, "runs",
                                                           "figures", PRESET)
GRID = 16 if SMOKE else 32    # positions in the gallery
BLOCK = 4                     # tile size of the gallery's tile maps
print(f"SMOKE={SMOKE} preset={PRESET} workdir={WORKDIR}")

# %% [markdown]
# ## A gallery of masks
#
# Each mask is called on broadcast position arrays (`mask(q_pos[:, None], k_pos[None, :])`),
# so the same object runs in numpy, under `jit` and inside a kernel on iota tiles. Masks
# compose with `&` and `|`; `Lambda(window, n_global)` is `Causal() & (Local(window) |
# Sinks(n_global))`. Below each mask: its tile classes with `BLOCK × BLOCK` tiles (white
# EMPTY, orange PARTIAL, blue FULL), from `mask.classify` on the tiles' position ranges.

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from experiments.figures import common, load
from experiments.figures.notebook import ipython_display, show, show_written
from lcattn import masks

mask_sparsity = load("mask_sparsity")
os.makedirs(WORKDIR, exist_ok=True)
GALLERY = {"Full()": masks.Full(), "Causal()": masks.Causal(), "Local(4)": masks.Local(4),
           "Causal() & Sinks(2)": masks.Causal() & masks.Sinks(2),
           "Chunked(4)": masks.Chunked(4),
           "Causal() & Chunked(4)": masks.Causal() & masks.Chunked(4),
           "Lambda(4, 2)": masks.Lambda(4, 2),
           "Causal() & (Local(2) | Chunked(8))":
               masks.Causal() & (masks.Local(2) | masks.Chunked(8))}
TILE_COLOURS = ListedColormap(["white", "tab:orange", "tab:blue"])
pos = np.arange(GRID)
fig, axes = plt.subplots(2, len(GALLERY), figsize=(2.1 * len(GALLERY), 4.4))
for (name, mask), top, bottom in zip(GALLERY.items(), axes[0], axes[1]):
    top.imshow(mask(pos[:, None], pos[None, :]), cmap="Greys", vmin=0, vmax=1)
    top.set_title(name, fontsize=8)
    bottom.imshow(mask_sparsity.tile_map(mask, GRID, BLOCK), cmap=TILE_COLOURS, vmin=0, vmax=2)
    bottom.set_xlabel(f"visible pairs {int(mask(pos[:, None], pos[None, :]).sum())}", fontsize=8)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set(xlabel="key position →", ylabel="← query position")
fig.tight_layout()
show(fig, WORKDIR, "mask_gallery")

# %% [markdown]
# `mask.count(q_pos, k_lo, k_hi)` gives the number of visible keys per query in closed form
# (LSSA's `N_i`), here checked against the grid:

# %%
for name, mask in GALLERY.items():
    counts = mask.count(pos, 0, GRID - 1)
    assert (counts == mask(pos[:, None], pos[None, :]).sum(1)).all(), name
    print(f"{name:36s} N_i = {counts.tolist()}")

# %% [markdown]
# ## Paper figure 6: Λ-mask distances and visited tiles
#
# `experiments.figures.mask_sparsity` (also `python -m experiments.figures
# --figure=mask_sparsity`): (a) the distance each visible pair is scored at under LM-Infinite
# (`i - j` inside the window, `D` on the sinks beyond it), (b) the tiles the block-sparse
# kernels visit for Causal, Local(4096) and Λ(4096, 64) at 8k, 32k and 128k tokens.

# %%
data = common.make(mask_sparsity, PRESET, WORKDIR)  # also writes .pdf and .json
show_written(WORKDIR, mask_sparsity.NAME)

# %% [markdown]
# ## Explore the Λ-mask
#
# Window, number of sinks, distance limit `D` and tile size; left: the effective distance of
# each visible pair (blank: invisible), right: the tile classes. With `ipywidgets` these are
# sliders; without it the cell draws the defaults (`pip install ipywidgets` to get them).

# %%
from lcattn.attention import AttentionSpec

try:
    import ipywidgets
except ImportError:
    ipywidgets = None


def explore(window=8, n_global=2, distance_limit=8, block=4, length=32):
    spec = AttentionSpec(mask=masks.Lambda(window, n_global), distance_limit=distance_limit)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4.2))
    fig.colorbar(a.imshow(mask_sparsity.effective_distance(spec, length)), ax=a, shrink=0.8)
    a.set_title(f"effective distance, Lambda({window}, {n_global}), D={distance_limit}")
    b.imshow(mask_sparsity.tile_map(spec.mask, length, block), cmap=TILE_COLOURS, vmin=0, vmax=2)
    b.set_title(f"tile classes, {block}×{block} tiles")
    show(fig, WORKDIR, "explore")


if ipywidgets is not None and ipython_display():
    ipywidgets.interact(explore, window=(1, 32), n_global=(0, 8), distance_limit=(1, 64),
                        block=[1, 2, 4, 8, 16], length=[32, 64, 128])
else:
    explore()
