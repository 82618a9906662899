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
# # Length generalization: LM-Infinite and LSSAR
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lcattn/lcattn/blob/main/notebooks/10_length_generalization.ipynb)
#
# Paper figures 1 and 3 of `experiments/figures/`: how attention variants trained at one
# length behave far past it. Figure 1 (LM-Infinite): per-position NLL up to 16× the training
# length for softmax + RoPE as trained, the same checkpoint under the Λ-mask with a distance
# limit (training-free), ALiBi and NoPE. Figure 3 (LSSAR): validation loss at 1–16× the
# training length for softmax, LSSA and LSSAR (p = 3, 15), beside the paper's table.
#
# Each figure is `experiments.figures.common.make(module, preset, workdir)`, the same as `python -m
# experiments.figures --figure=NAME --preset=PRESET`: it trains and evaluates the runs it needs into
# `WORKDIR/runs/` (runs already there are reused, also by the other figures and by the command line)
# and writes `NAME.png`, `.pdf`, `.json` and a markdown table beside the paper's numbers. Presets:
# `smoke` (seconds per run, meaningless numbers: the tests), `quick` (the tiny model on CPU: about a
# minute per run on 2 CPU cores, runs shared between the figures) and `paper` (sized for one
# H100/H200: estimated, not measured, in `configs/figures/paper.gin`). The preset is chosen from the
# backend below; set `LCATTN_PRESET` to override it.

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
# Parameters: the preset from the backend, and the workdir the command line uses too.
from experiments import configurables

SMOKE = os.environ.get("LCATTN_SMOKE", "0") == "1"
ACCELERATOR = jax.default_backend() in ("tpu", "gpu")
PRESET = os.environ.get("LCATTN_PRESET") or ("smoke" if SMOKE else
                                             "paper" if ACCELERATOR else "quick")
WORKDIR = os.environ.get("LCATTN_WORKDIR") or os.path.join(configurables.REPO_ROOT, "runs",
                                                           "figures", PRESET)
print(f"SMOKE={SMOKE} preset={PRESET} workdir={WORKDIR}")

# %%
from experiments import figures
from experiments.figures import common
from experiments.figures.notebook import show_written

configurables.setup_logging()  # progress of each training and evaluation

# %% [markdown]
# ## Figure 1: LM-Infinite, NLL against position
#
# Softmax + RoPE fails past its training length (dashed line); the same weights under
# `Lambda(L, 10)` with distance limit `L` (`configs/attention/lminfinite.gin`) need no
# training. The table gives the validation loss by eval length and its ratio to the 1× loss.

# %%
common.make(figures.load("lminfinite_nll"), PRESET, WORKDIR)
show_written(WORKDIR, "lminfinite_nll")

# %% [markdown]
# ## Figure 3: LSSA / LSSAR length extrapolation
#
# Each variant trained at the same length and evaluated as trained; the paper's numbers are
# absolute losses of a far larger model, so compare the ratios to the 1× loss.

# %%
common.make(figures.load("lssar_extrapolation"), PRESET, WORKDIR)
show_written(WORKDIR, "lssar_extrapolation")
