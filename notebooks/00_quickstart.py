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
# # lcattn quickstart
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lcattn/lcattn/blob/main/notebooks/00_quickstart.ipynb)
#
# One `lcattn.attend()` call over masks × normalizers, checked against the dense `reference`
# backend; a tiny byte-level `DecoderLM` trained for about a minute with `experiments.train`
# (gin configs, as on the command line); its parameters with `nnx.display`; and greedy
# generation past the training length under LM-Infinite's Λ-mask, whose KV cache keeps a
# constant size however long the text grows.

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
# Parameters. LCATTN_SMOKE=1 (the tests) shrinks everything to seconds; its numbers mean nothing.
import tempfile

SMOKE = os.environ.get("LCATTN_SMOKE", "0") == "1"
ACCELERATOR = jax.default_backend() in ("tpu", "gpu")
WORKDIR = os.environ.get("LCATTN_WORKDIR") or tempfile.mkdtemp(prefix="lcattn_quickstart_")
ATTEND_LENGTH = 256 if SMOKE else (8192 if ACCELERATOR else 1024)
SEQ_LEN = 32 if SMOKE else 128              # training length (bytes)
TRAIN_STEPS = 4 if SMOKE else (1000 if ACCELERATOR else 300)  # ~1 min on 2 CPU cores
BATCH_SIZE = 2 if SMOKE else 16
NEW_TOKENS = 24 if SMOKE else 4 * SEQ_LEN   # generate well past the training length
print(f"SMOKE={SMOKE} workdir={WORKDIR}")

# %% [markdown]
# ## `attend()` over masks × normalizers
#
# Layout `[batch, seq, heads, head_dim]`, here with grouped-query attention (4 query heads
# reading 2 key/value heads). `backend="auto"` picks the platform's backend (the block-sparse
# `xla` scan on CPU, which skips the tiles a mask hides); `"reference"` is the dense oracle
# that builds the whole score matrix. `attend` composes with `jax.jit` (the spec, backend and
# tile sizes are static), `jax.grad` and `jax.vmap`.

# %%
import itertools

import jax.numpy as jnp
import matplotlib.pyplot as plt

import lcattn
from experiments.figures.notebook import show
from lcattn import masks, normalizers

kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (1, ATTEND_LENGTH, 4, 32))
k = jax.random.normal(kk, (1, ATTEND_LENGTH, 2, 32))
v = jax.random.normal(kv, (1, ATTEND_LENGTH, 2, 32))
MASKS = {"Causal()": masks.Causal(), "Local(64)": masks.Local(64),
         "Lambda(64, 4)": masks.Lambda(64, 4), "Causal() & Chunked(128)":
         masks.Causal() & masks.Chunked(128)}
NORMALIZERS = {"softmax": normalizers.Softmax(), "LSSA": normalizers.Softplus(),
               "LSSAR p=15": normalizers.Reweighted(p=15)}
attend = jax.jit(lcattn.attend, static_argnames=("spec", "backend", "block_sizes"))
print("auto ->", lcattn.backends.resolve_backend("auto", lcattn.AttentionSpec()).name)
# SMOKE: one mask per normalizer (each pair compiles twice); otherwise every pair.
PAIRS = zip(MASKS, NORMALIZERS) if SMOKE else itertools.product(MASKS, NORMALIZERS)
for mask_name, norm_name in PAIRS:
    spec = lcattn.AttentionSpec(mask=MASKS[mask_name], normalizer=NORMALIZERS[norm_name])
    out = attend(q, k, v, spec=spec, backend="auto", block_sizes=(128, 128))
    ref = attend(q, k, v, spec=spec, backend="reference")
    print(f"{mask_name:24s} {norm_name:11s} max |auto - reference| = "
          f"{float(jnp.max(jnp.abs(out - ref))):.1e}")

# %% [markdown]
# LM-Infinite: `Lambda(window, n_global)` with `distance_limit=D` scores the sink keys beyond
# the window as if they sat at distance `D`, the same in every backend.

# %%
spec = lcattn.AttentionSpec(mask=masks.Lambda(64, 4), distance_limit=64)
err = jnp.max(jnp.abs(attend(q, k, v, spec=spec, backend="auto", block_sizes=(128, 128))
                      - attend(q, k, v, spec=spec, backend="reference")))
print(f"LM-Infinite Lambda(64, 4), D=64: max |auto - reference| = {float(err):.1e}")

# %% [markdown]
# ## Train a tiny model
#
# The same gin files as `python -m experiments.train --gin_file=configs/base.gin
# --gin_file=configs/models/tiny.gin --gin_file=configs/attention/softmax_rope.gin`: a 2-layer
# byte-level decoder (softmax attention with RoPE, causal mask) on the embedded corpus (the
# CPython standard library's own sources). The workdir gets `config.gin`, `metrics.jsonl` and
# orbax checkpoints; running the cell again resumes from the newest one.

# %%
from experiments import configurables
from experiments import evaluate as evaluate_lib
from experiments import train as train_lib

configurables.setup_logging()
configurables.parse(
    ["configs/base.gin", "configs/models/tiny.gin", "configs/attention/softmax_rope.gin"],
    [f"SEQ_LEN = {SEQ_LEN}", f"train.num_steps = {TRAIN_STEPS}",
     f"train.batch_size = {BATCH_SIZE}", f"train.warmup_steps = {max(1, TRAIN_STEPS // 10)}",
     f"train.log_every = {max(1, TRAIN_STEPS // 10)}"])
print("last metrics:", train_lib.train(WORKDIR))
model, step = evaluate_lib.restore_model(WORKDIR)
print(f"restored step {step}")

# %%
import json

with open(os.path.join(WORKDIR, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], "o-")
ax.set(xlabel="step", ylabel="training loss (nats/byte)", title="tiny softmax+RoPE model")
show(fig, WORKDIR, "training_loss")

# %% [markdown]
# ## The model
#
# `nnx.display` draws the module tree with treescope in a notebook (and prints it elsewhere).

# %%
from flax import nnx

from lcattn.model import count_params

print(f"{count_params(model):,} parameters")
nnx.display(model)

# %% [markdown]
# ## Generate past the training length
#
# Greedy decoding with a KV cache: one compiled program (prefill, then a `lax.scan` of decode
# steps). As trained, the cache holds every position. Under LM-Infinite's Λ-mask
# (`Lambda(SEQ_LEN, 10)`, distance limit `SEQ_LEN`: training-free) a query sees only the 10
# sink tokens and the last `SEQ_LEN` tokens, so the cache is a sink + ring buffer of
# `10 + SEQ_LEN` slots whatever the length. (Greedy text from a model this small soon repeats
# itself; notebook 10 measures what the Λ-mask does to the loss far past the training length.)

# %%
from experiments.data import decode, encode
from lcattn.model import generate

LM_INFINITE = lcattn.AttentionSpec(mask=masks.Lambda(SEQ_LEN, 10), distance_limit=SEQ_LEN)
prompt = jnp.asarray(encode("class Parser:\n    def __init__(self, text):\n        self.")[None])
for name, override in (("as trained", None), ("LM-Infinite", LM_INFINITE)):
    tokens = generate(model, prompt, NEW_TOKENS, attention_override=override)
    print(f"{name:11s} {NEW_TOKENS} new bytes: {decode(tokens[0])!r:.160}...")

# %%
for name, override, max_len in (("full", None, 4_096), ("full", None, 65_536),
                                ("Λ-mask", LM_INFINITE, 4_096),
                                ("Λ-mask", LM_INFINITE, 1_000_000)):
    cache = model.init_cache(1, max_len, attention_override=override)
    size = sum(x.nbytes for x in jax.tree.leaves(cache))
    print(f"{name:6s} cache for {max_len:>9,} positions: {cache[0].size:>6,} slots per layer, "
          f"{size / 2**10:>8,.0f} KiB")
