"""Ring attention: what the plan sends, and CPU timings of ring vs all-gather vs one device.

Run (from the repository root; the script asks for 8 host CPU devices itself)::

    PYTHONPATH=. python -m experiments.benchmarks.ring \\
        --out=experiments/benchmarks/results/ring.json

1. Plan (no hardware): bytes one device receives per attention pass for each mask of
   ``--plan_masks`` at sequence lengths ``--plan_lengths`` on ``--plan_devices`` devices
   (contiguous layout), from ``lcattn.backends.ring_plan.make_plan``, against a ring that
   sends every shard around (``n - 1`` shards) and against an all-gather (the same bytes,
   held at once). A key costs K and V in float32 plus its int32 position:
   ``(2 * kv_heads * head_dim * 4 + 4) * batch`` bytes (``--kv_heads``, ``--head_dim``).
2. Timing (8 host devices on this machine's cores: the devices share them, so this measures
   overhead, not speed): ``lcattn.attend`` forward + backward (``value_and_grad`` of a
   weighted sum w.r.t. q, k, v) at ``--seq_len`` on a ``context=8`` mesh with
   ``context_strategy`` ring and all_gather, and on one device, each as a ratio to one device,
   with the compiled program's temporary bytes (per device for the sharded ones); Causal also
   in the zigzag layout (inputs reordered once, outside the timed function).
3. Work balance (no hardware): non-empty 512 x 512 tiles per device over all hops, contiguous
   vs zigzag, at the first ``--plan_lengths``: the busiest device over the mean.
4. Memory (compile only): per-device temporaries of the Causal ring's ``value_and_grad`` at a
   fixed ``--memory_per_device`` tokens per device on ``context = 2, 4, 8`` (the scanned ring
   from 3 devices on), against one device holding the whole sequence and one holding a shard.

Prints one JSON object on stdout (progress on stderr); ``--out`` also writes it and a PNG.
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import platform  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lcattn  # noqa: E402
from experiments.benchmarks.timing import compile_and_time, emit, log  # noqa: E402
from lcattn import masks, sharding  # noqa: E402
from lcattn.backends import ring_plan  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_PLAN_LENGTHS = flags.DEFINE_list("plan_lengths", ["131072", "1048576"], "Plan: T.")
_PLAN_DEVICES = flags.DEFINE_list("plan_devices", ["8", "64", "256"], "Plan: devices n.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Plan: kv heads per key.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Plan: head width.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "Timing: sequence length.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timing: timed calls.")
_MEMORY_PER_DEVICE = flags.DEFINE_integer("memory_per_device", 4096,
                                          "Memory: tokens per device.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON report here (and a PNG).")

PLAN_MASKS = {"causal": masks.Causal(), "local4096": masks.Local(4096),
              "lambda4096_64": masks.Lambda(4096, 64)}
TIMING_MASKS = {"causal": masks.Causal(), "local1024": masks.Local(1024),
                "lambda1024_64": masks.Lambda(1024, 64)}


def plan_rows() -> list[dict]:
    per_key = 2 * _KV_HEADS.value * _HEAD_DIM.value * 4 + 4
    rows = []
    for t in map(int, _PLAN_LENGTHS.value):
        for n in map(int, _PLAN_DEVICES.value):
            for name, mask in PLAN_MASKS.items():
                log(f"plan: {name} T={t} n={n}")
                plan = ring_plan.make_plan(mask, n, t // n)
                rows.append({"mask": name, "seq_len": t, "devices": n,
                             "hops": len(plan.hops),
                             "broadcasts": int(plan.broadcast is not None),
                             "bytes_received": plan.keys_received() * per_key,
                             "bytes_full_ring": (n - 1) * (t // n) * per_key})
    return rows


def _inputs(t, b=1, h=4, hk=2, d=64, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, t, hh, d)), jnp.float32)
                 for hh in (h, hk, hk, h))


def _one_device_grad(spec, cot):
    return jax.value_and_grad(lambda q, k, v: jnp.sum(
        lcattn.attend(q, k, v, spec, backend="xla") * cot), argnums=(0, 1, 2))


def _ring_grad(spec, mesh, cot, strategy="ring", layout="contiguous"):
    def local(q, k, v, c, pos):
        out = lcattn.attend(q, k, v, spec, backend="xla", q_positions=pos, k_positions=pos,
                            context_axis="context", context_strategy=strategy,
                            context_layout=layout)
        return jax.lax.psum(jnp.sum(out * c), "context")

    rows = P(None, "context")
    fn = jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 5, out_specs=P())
    order = ring_plan.layout_order(layout, mesh.shape["context"], cot.shape[1])
    pos = jnp.asarray(order, jnp.int32)[None]
    return order, jax.value_and_grad(lambda q, k, v: fn(q, k, v, cot[:, order], pos),
                                     argnums=(0, 1, 2))


def work_rows(block: int = 512) -> list[dict]:
    """Non-empty tiles (``block``, or half a shard if smaller) each device attends over all
    hops, per layout: the busiest device sets a ring step's time on hardware where devices run
    in parallel."""
    rows = []
    t = int(_PLAN_LENGTHS.value[0])
    for n in map(int, _PLAN_DEVICES.value):
        for name, mask in PLAN_MASKS.items():
            for layout in ring_plan.LAYOUTS:
                pos = ring_plan.global_positions(layout, n, t // n)
                step = min(block, t // n // 2)  # a tile never straddles a zigzag chunk
                lo = pos[:, ::step]  # [n, blocks]: first index of each tile (runs are aligned)
                hi = lo + step - 1
                tiles = [int(np.sum(mask.classify(lo[r][:, None], hi[r][:, None],
                                                  lo.reshape(-1)[None], hi.reshape(-1)[None])
                                    != 0)) for r in range(n)]
                rows.append({"mask": name, "seq_len": t, "devices": n, "layout": layout,
                             "busiest_tiles": max(tiles), "mean_tiles": float(np.mean(tiles)),
                             "tile": step,
                             "imbalance": float(max(tiles) / np.mean(tiles))})
    return rows


def timing_rows() -> list[dict]:
    q, k, v, cot = _inputs(_SEQ_LEN.value)
    mesh = sharding.make_mesh(context=8)
    rows = []
    for name, mask in TIMING_MASKS.items():
        spec = lcattn.AttentionSpec(mask=mask)
        record = {"mask": name}
        log(f"timing: {name} one device")
        rec, _ = compile_and_time(_one_device_grad(spec, cot), (q, k, v), _REPEATS.value)
        record["single_seconds"] = rec["seconds"]
        record["single_temp_bytes"] = rec.get("temp_size_in_bytes")
        variants = [("ring", "ring", "contiguous"), ("all_gather", "all_gather", "contiguous")]
        if name == "causal":
            variants.append(("ring_zigzag", "ring", "zigzag"))
        for label, strategy, layout in variants:
            order, grad = _ring_grad(spec, mesh, cot, strategy, layout)
            log(f"timing: {name} {label}")
            rec, _ = compile_and_time(grad, (q[:, order], k[:, order], v[:, order]),
                                      _REPEATS.value)
            record[f"{label}_seconds"] = rec["seconds"]
            record[f"{label}_temp_bytes_per_device"] = rec.get("temp_size_in_bytes")
            record[f"{label}_vs_single"] = rec["seconds"] / record["single_seconds"]
        rows.append(record)
    return rows


def _temp_bytes(fn, args) -> int:
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def memory_rows() -> list[dict]:
    per, spec = _MEMORY_PER_DEVICE.value, lcattn.AttentionSpec(mask=masks.Causal())
    rows = []
    for n in (2, 4, 8):
        t = per * n
        log(f"memory: causal T={t} on {n} devices")
        q, k, v, cot = _inputs(t)
        mesh = sharding.make_mesh(context=n, devices=jax.devices()[:n])
        _, grad = _ring_grad(spec, mesh, cot)
        rows.append({"devices": n, "seq_len": t, "per_device": per,
                     "ring_temp_bytes_per_device": _temp_bytes(grad, (q, k, v)),
                     "one_device_whole_temp_bytes": _temp_bytes(
                         _one_device_grad(spec, cot), (q, k, v)),
                     "one_device_shard_temp_bytes": _temp_bytes(
                         _one_device_grad(spec, cot[:, :per]), (q[:, :per], k[:, :per],
                                                                v[:, :per]))})
    return rows


def _plot(report, path):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for t in sorted({r["seq_len"] for r in report["plan"]}):
        for name in PLAN_MASKS:
            rows = [r for r in report["plan"] if r["mask"] == name and r["seq_len"] == t]
            ax.plot([r["devices"] for r in rows], [r["bytes_received"] / 2**20 for r in rows],
                    "o-", label=f"{name}, T={t // 1024}k")
        rows = [r for r in report["plan"] if r["mask"] == "causal" and r["seq_len"] == t]
        ax.plot([r["devices"] for r in rows], [r["bytes_full_ring"] / 2**20 for r in rows],
                "k:", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="devices on the context axis",
           ylabel="MiB received per device per pass",
           title="ring plan (dotted: a ring that sends every shard)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "devices": jax.device_count(), "jax": jax.__version__},
              "per_key_bytes": 2 * _KV_HEADS.value * _HEAD_DIM.value * 4 + 4,
              "plan": plan_rows(), "work": work_rows(), "timing_seq_len": _SEQ_LEN.value,
              "timing": timing_rows(),
              "memory": memory_rows()}
    emit(report, _OUT.value, _plot)


if __name__ == "__main__":
    app.run(main)
