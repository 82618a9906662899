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
   with the compiled program's temporary bytes (per device for the sharded ones).

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


def timing_rows() -> list[dict]:
    t, b, h, hk, d = _SEQ_LEN.value, 1, 4, 2, 64
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, hh, d)), jnp.float32)
               for hh in (h, hk, hk))
    cot = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    mesh = sharding.make_mesh(context=8)
    rows = []
    for name, mask in TIMING_MASKS.items():
        spec = lcattn.AttentionSpec(mask=mask)
        one = jax.value_and_grad(lambda q, k, v: jnp.sum(
            lcattn.attend(q, k, v, spec, backend="xla") * cot), argnums=(0, 1, 2))
        record = {"mask": name}
        log(f"timing: {name} one device")
        rec, _ = compile_and_time(one, (q, k, v), _REPEATS.value)
        record["single_seconds"] = rec["seconds"]
        record["single_temp_bytes"] = rec.get("temp_size_in_bytes")
        for strategy in ("ring", "all_gather"):
            def local(q, k, v, c, strategy=strategy):
                out = lcattn.attend(q, k, v, spec, backend="xla", context_axis="context",
                                    context_strategy=strategy)
                return jax.lax.psum(jnp.sum(out * c), "context")

            fn = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "context"),) * 4,
                               out_specs=P())
            grad = jax.value_and_grad(lambda q, k, v, fn=fn: fn(q, k, v, cot), argnums=(0, 1, 2))
            log(f"timing: {name} {strategy}")
            rec, _ = compile_and_time(grad, (q, k, v), _REPEATS.value)
            record[f"{strategy}_seconds"] = rec["seconds"]
            record[f"{strategy}_temp_bytes_per_device"] = rec.get("temp_size_in_bytes")
            record[f"{strategy}_vs_single"] = rec["seconds"] / record["single_seconds"]
        rows.append(record)
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
              "plan": plan_rows(), "timing_seq_len": _SEQ_LEN.value, "timing": timing_rows()}
    emit(report, _OUT.value, _plot)


if __name__ == "__main__":
    app.run(main)
