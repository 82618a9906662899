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
# # Normalizers: softmax, LSSA, LSSAR
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lcattn/lcattn/blob/main/notebooks/02_normalizers.ipynb)
#
# The three normalizers of `lcattn.normalizers` turn one query's scores against `N` visible
# keys into an attention row:
#
# * `Softmax()`: `softmax_j(q·k_j / sqrt(d))`;
# * `Softplus()` (LSSA, eq. 4): logits `log(d) · log(N) · cos(q, k_j)`, softplus, ℓ1-normalized;
# * `Reweighted(p)` (LSSAR, eq. 5): `ReLU(N · A_j − 1)^p` on the LSSA row `A`, renormalized.
#
# Below: the rows on the same query and keys, their entropy as `N` grows (softmax and LSSA spread
# towards uniform, LSSAR stays sharp), and how LSSAR sharpens with `p`. Every weight comes from the
# normalizers' own `prepare` and `dense_weights` (the equations the `reference` backend applies).

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
# Parameters. LCATTN_SMOKE=1 (the tests) shrinks the sweep to seconds.
import tempfile

SMOKE = os.environ.get("LCATTN_SMOKE", "0") == "1"
ACCELERATOR = jax.default_backend() in ("tpu", "gpu")
WORKDIR = os.environ.get("LCATTN_WORKDIR") or tempfile.mkdtemp(prefix="lcattn_normalizers_")
HEAD_DIM = 64
MAX_LOG2_N = 8 if SMOKE else (20 if ACCELERATOR else 16)  # N = 2, 4, ..., 2**MAX_LOG2_N
QUERIES = 4 if SMOKE else 64     # entropies are averaged over this many queries
SIGNAL = 0.75                    # each query is SIGNAL * (key 0) + noise
P_VALUES = (1, 2, 3, 5, 8, 15, 30)
print(f"SMOKE={SMOKE} N up to 2**{MAX_LOG2_N}, {QUERIES} queries")

# %% [markdown]
# ## One attention row
#
# `rows(normalizer, queries, keys, n)` attends each query to the first `n` keys: the
# normalizer scales q and k (`prepare`; LSSA normalizes them and scales by `log(d) log(n)`),
# the scores are their dot products, and `dense_weights` applies the paper's equation to the
# visible keys (LSSAR reads `N = n` and the query position from the row context). The queries
# point at key 0: `SIGNAL * k_0 + noise`.

# %%
import functools

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.scipy.special import entr

from experiments.figures.notebook import ipython_display, show
from lcattn import normalizers


@functools.partial(jax.jit, static_argnums=0)
def rows(norm, queries, keys, n):
    """Rows ``[Q, K]`` of ``queries [Q, d]`` over the first ``n`` of ``keys [K, d]`` (0 after)."""
    qs, ks = norm.prepare(queries, keys, jnp.full(queries.shape[:1], jnp.log(n)))
    ctx = {name: jnp.full((len(queries), 1), n, jnp.float32) for name in ("count", "q_pos")}
    return norm.dense_weights(qs @ ks.T, (jnp.arange(len(keys)) < n)[None], ctx)


k_keys, k_noise = jax.random.split(jax.random.key(0))
KEYS = jax.random.normal(k_keys, (2**MAX_LOG2_N, HEAD_DIM))
QUERY_BATCH = SIGNAL * KEYS[0] + jax.random.normal(k_noise, (QUERIES, HEAD_DIM))
NORMALIZERS = {"softmax": normalizers.Softmax(), "LSSA": normalizers.Softplus(),
               "LSSAR p=3": normalizers.Reweighted(p=3), "LSSAR p=15": normalizers.Reweighted(p=15)}
one_row = np.stack([rows(norm, QUERY_BATCH[:1], KEYS, 32)[0, :32]
                    for norm in NORMALIZERS.values()])
fig, ax = plt.subplots(figsize=(8, 3))
for name, row in zip(NORMALIZERS, one_row):
    ax.plot(row, "o-", ms=3, label=name)
ax.set(xlabel="key j (key 0 is the query's target)", ylabel="attention weight",
       title="one query, 32 keys, the same q and k for every normalizer")
ax.legend()
show(fig, WORKDIR, "rows")

# %% [markdown]
# The same rows as an array: with `treescope` (installed with flax) an interactive heat map,
# otherwise printed.

# %%
try:
    import treescope
except ImportError:
    treescope = None

if treescope is not None and ipython_display():
    ipython_display().display(treescope.render_array(
        one_row, axis_labels={0: "normalizer", 1: "key"},
        axis_item_labels={0: list(NORMALIZERS)}, pixels_per_cell=14))
else:
    with np.printoptions(precision=3, suppress=True, linewidth=120):
        print("\n".join(f"{name:11s} {row}" for name, row in zip(NORMALIZERS, one_row)))

# %% [markdown]
# ## Entropy against the number of visible keys
#
# The uniform row has entropy `log N`. On random keys, softmax and LSSA rows follow it up as
# `N` grows: the weight on the target key fades into the crowd. LSSAR's re-weighting keeps
# only the keys above the mean LSSA weight (`N · A_j > 1`), raised to the power `p`, so its
# entropy stays far below `log N` and the target keeps most of the weight much longer.

# %%
NS = 2 ** np.arange(1, MAX_LOG2_N + 1)
entropy, target_mass = {}, {}
for name, norm in NORMALIZERS.items():
    rows_n = [rows(norm, QUERY_BATCH, KEYS, int(n)) for n in NS]  # one compilation
    entropy[name] = np.array([float(entr(r).sum(-1).mean()) for r in rows_n])
    target_mass[name] = np.array([float(r[:, 0].mean()) for r in rows_n])

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
a.plot(NS, np.log(NS), "k--", lw=1, label="uniform (log N)")
for name in NORMALIZERS:
    a.plot(NS, entropy[name], "o-", ms=3, label=name)
    b.plot(NS, target_mass[name], "o-", ms=3, label=name)
a.set(xscale="log", xlabel="visible keys N", ylabel="entropy (nats)", title="row entropy")
b.set(xscale="log", xlabel="visible keys N", ylabel="weight on the target key",
      title="attention kept on the target")
a.legend(fontsize=8)
show(fig, WORKDIR, "entropy_vs_n")

# %% [markdown]
# ## LSSAR: sharpening with `p`
#
# At a fixed `N`, larger `p` concentrates the re-weighted row on fewer keys; `p = 1` is LSSA
# with the below-mean keys cut off.

# %%
N_SHARPEN = int(NS[len(NS) // 2])
rows_p = {p: rows(normalizers.Reweighted(p=float(p)), QUERY_BATCH, KEYS, N_SHARPEN)
          for p in P_VALUES}
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
a.plot(P_VALUES, [float(entr(r).sum(-1).mean()) for r in rows_p.values()], "o-")
a.axhline(entropy["LSSA"][len(NS) // 2], color="gray", ls="--", lw=1, label="LSSA")
a.set(xscale="log", xlabel="p", ylabel="entropy (nats)", title=f"LSSAR row entropy, N={N_SHARPEN}")
a.legend()
for p, r in rows_p.items():
    b.plot(np.sort(np.asarray(r[0]))[::-1][:20], "o-", ms=3, label=f"p={p}")
b.set(yscale="log", xlabel="rank", ylabel="weight", title="largest 20 weights of one row")
b.legend(fontsize=7, ncol=2)
show(fig, WORKDIR, "sharpening_with_p")
