"""What the Pallas TPU kernels' block lists predict: visited tiles and bytes moved, per head.

Run (from the repository root)::

    PYTHONPATH=. python -m experiments.benchmarks.pallas_tpu_metadata \
        --out=experiments/benchmarks/results/pallas_tpu_metadata.json

No TPU is needed: the numbers come from ``pallas_kernels.block_sparse`` (the same schedules the
kernels scalar-prefetch), not from a run. For each T, mask and pass (forward: q-block rows;
dK/dV: the transposed lists) it reports grid steps, visited tiles (FULL / PARTIAL), block
loads (a load only when the block index changes between grid steps, which is when the Pallas
pipeline issues a DMA) and the bytes they move for bfloat16 q/k/v with ``--head_dim``, against
a dense causal kernel (what one writes without block lists: a ``nq x nk`` grid that loads every
K/V block for every q block and masks in the kernel). ``ratio`` = dense / lists. Prints one
JSON object; ``--out`` writes it and a PNG of visited tiles against T next to it.
"""
from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags

from experiments.benchmarks.timing import emit, log
from lcattn import masks
from pallas_kernels import block_sparse

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "32768", "131072"], "Sequence lengths.")
_BLOCKS = flags.DEFINE_list("block_sizes", ["512", "512"], "block_q,block_k.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension (bytes moved).")
_WINDOW = flags.DEFINE_integer("window", 2048, "Lambda mask window.")
_N_GLOBAL = flags.DEFINE_integer("n_global", 64, "Lambda mask sink tokens.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON here, and a PNG with the same stem.")

BF16 = 2


def _bytes(stats, t, block_k, d):
    """Forward bytes per head: q read once, kv loads, out written once (+ float32 lse)."""
    return t * d * BF16 + stats["block_fetches"] * block_k * 2 * d * BF16 + t * (d * BF16 + 4)


def measure(t: int, mask_name: str, bq: int, bk: int, d: int) -> dict:
    mask = masks.Causal() if mask_name == "causal" else masks.Lambda(_WINDOW.value,
                                                                     _N_GLOBAL.value)
    pos = np.arange(t, dtype=np.int32)[None]
    classes = block_sparse.tile_classes(mask, pos, pos, bq, bk)
    fwd = block_sparse.visit_stats(block_sparse.schedule(block_sparse.block_lists(classes)))
    dkv = block_sparse.visit_stats(block_sparse.schedule(block_sparse.block_lists(classes.T)))
    nq, nk = classes.shape
    dense = {"grid_steps": nq * nk, "visited_tiles": nq * nk, "block_fetches": nq * nk}
    rec = {"seq_len": t, "mask": repr(mask), "block_sizes": [bq, bk], "head_dim": d,
           "forward": {**fwd, "bytes": _bytes(fwd, t, bk, d),
                       "flops": 4 * fwd["visited_tiles"] * bq * bk * d},
           "dkv": dkv,
           "dense_causal_kernel": {**dense, "bytes": _bytes(dense, t, bk, d),
                                   "flops": 4 * nq * nk * bq * bk * d}}
    rec["ratio"] = {"visited_tiles": dense["visited_tiles"] / fwd["visited_tiles"],
                    "bytes": rec["dense_causal_kernel"]["bytes"] / rec["forward"]["bytes"]}
    return rec


def plot(result, path: pathlib.Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = result["records"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r["mask"] for r in records}):
        rs = [r for r in records if r["mask"] == name]
        ax.loglog([r["seq_len"] for r in rs], [r["forward"]["visited_tiles"] for r in rs], "o-",
                  label=f"block lists, {name}")
    rs = [r for r in records if r["mask"] == records[0]["mask"]]
    ax.loglog([r["seq_len"] for r in rs], [r["dense_causal_kernel"]["visited_tiles"] for r in rs],
              "k--", label="dense causal kernel")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("tiles visited per head (forward)")
    ax.set_title(f"Pallas TPU metadata, blocks {tuple(records[0]['block_sizes'])}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    bq, bk = (int(b) for b in _BLOCKS.value)
    records = []
    for t in (int(s) for s in _SEQ_LENS.value):
        for mask_name in ("causal", "lambda"):
            records.append(measure(t, mask_name, bq, bk, _HEAD_DIM.value))
            log(f"T={t} {mask_name}: {records[-1]['forward']['visited_tiles']} tiles, "
                f"{records[-1]['ratio']['bytes']:.1f}x fewer bytes than dense")
    result = {"what": "per-head predictions from the block lists (no device run)",
              "records": records}
    emit(result, _OUT.value, plot)


if __name__ == "__main__":
    app.run(main)
