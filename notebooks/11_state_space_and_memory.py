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
# # State-space models and memory: state collapse, HMT
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lcattn/lcattn/blob/main/notebooks/11_state_space_and_memory.ipynb)
#
# Paper figures 4 and 5 of `experiments/figures/`. Figure 4 (Stuffed Mamba): Mamba-2's NLL
# far past its training length for several training lengths, the training-free state-collapse
# mitigations of `lcattn.ssm.SSMOptions` on the shortest one, and passkey accuracy over depth
# × length. Figure 5 (HMT): validation loss against the number of segments for a backbone that
# sees one segment, the same backbone with sliding-window attention, and the backbone inside
# HMT's hierarchical memory (`lcattn.memory`).
#
# Each figure is `experiments.figures.common.make(module, preset, workdir)`, the same as `python -m
# experiments.figures --figure=NAME --preset=PRESET`: it trains and evaluates the runs it needs into
# `WORKDIR/runs/` (runs already there are reused, also by the other figures and by the command line)
# and writes `NAME.png`, `.pdf`, `.json` and a markdown table beside the paper's numbers. Presets:
# `smoke` (seconds per run, meaningless numbers: the tests), `quick` (the tiny model on CPU: minutes
# per figure on 2 CPU cores) and `paper` (sized for one H100/H200: estimated, not measured, in each
# figure module's `SIZES`). The preset is chosen from the backend below; set `LCATTN_PRESET` to
# override it.

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
# ## Figure 4: state collapse and its mitigations
#
# Mamba-2 (`configs/models/mamba2.gin`) trained at each length; (a) per-position NLL at the
# longest eval length, (b) the shortest-trained checkpoint under decay scaling, a state-norm
# clamp and the sliding window by state difference, (c) passkey accuracy.

# %%
common.make(figures.load("state_collapse"), PRESET, WORKDIR)
show_written(WORKDIR, "state_collapse")

# %% [markdown]
# ## Figure 5: HMT against the number of segments
#
# The three variants of `configs/sweeps/hmt_quick.gin` trained on the same rows; (a) loss
# against the number of segments read, (b) NLL by position inside a segment.

# %%
common.make(figures.load("hmt_segments"), PRESET, WORKDIR)
show_written(WORKDIR, "hmt_segments")
