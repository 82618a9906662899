"""Sharded training: per-device memory of a model under each mesh, and step throughput on
``--devices`` host devices against one.

Run (from the repository root; the script asks for 8 host CPU devices itself)::

    PYTHONPATH=. python -m experiments.benchmarks.sharding \\
        --out=experiments/benchmarks/results/sharding_cpu.json

1. Memory (``--memory_model``, default ``base``): for every mesh of ``--meshes`` (the
   ``configs/mesh/*.gin`` names), the per-device bytes of parameters and AdamW state, summed
   over each array's shard shape from the shardings the rules give (the most loaded device),
   and the compiled train step's ``memory_analysis()`` (arguments, outputs, temporaries: the
   program one device runs). Nothing is allocated: the step is lowered from
   ``ShapeDtypeStruct``s.
2. Throughput (``--throughput_models``): the train step (``experiments.train.make_train_step``,
   batch ``--batch`` x ``--seq_len``) timed on one device and on each mesh, as tokens/s and the
   ratio to one device. On a CPU the host devices share the same cores, so this measures the
   overhead of partitioning (collectives, resharding), not a speed-up.

Prints one JSON object on stdout (progress on stderr); ``--out`` also writes it and a PNG.
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import math  # noqa: E402
import platform  # noqa: E402

import jax  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import configurables  # noqa: E402
from experiments import train as train_lib  # noqa: E402
from experiments.benchmarks.timing import compile_and_time, emit, log, memory_fields  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_MESHES = flags.DEFINE_list("meshes", ["single", "dp8", "fsdp8", "dp2_fsdp2_tp2"],
                            "configs/mesh/<name>.gin files to compare.")
_MEMORY_MODEL = flags.DEFINE_string("memory_model", "base", "configs/models/<name>.gin.")
_THROUGHPUT_MODELS = flags.DEFINE_list("throughput_models", ["tiny", "small"],
                                       "configs/models/<name>.gin to time.")
_BATCH = flags.DEFINE_integer("batch", 16, "Global batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per configuration.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON report here (and a PNG).")


def _setup(model_name: str, mesh_name: str):
    """Model, optimizer and shardings of ``configs/models/<model_name>.gin`` on a mesh."""
    configurables.parse(["configs/base.gin", f"configs/models/{model_name}.gin",
                         "configs/attention/softmax_rope.gin", f"configs/mesh/{mesh_name}.gin"],
                        [])
    mesh = configurables.check_mesh(
        "benchmark", None if mesh_name == "single" else configurables.make_mesh())
    model = train_lib.build_model()
    tx = train_lib.make_optimizer(optax.constant_schedule(1e-3), 0.1, 1.0)
    graphdef, param_state, rest, params = train_lib.split_model(model)
    shard = train_lib.Shardings.of(param_state, params, tx, mesh, configurables.axis_rules())
    step = train_lib.make_train_step(graphdef, param_state, rest, tx, shard)
    return mesh, params, tx, shard, step


def _per_device_bytes(tree, shardings) -> int:
    """Bytes on the most loaded device: each array's shard size, summed per device."""
    per_device: dict = {}
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
            shardings, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))):
        shard_bytes = math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for device in s.device_set:
            per_device[device] = per_device.get(device, 0) + shard_bytes
    return max(per_device.values())


def _batch(shard, batch, seq_len, abstract=False):
    names = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    if abstract:
        return {k: jax.ShapeDtypeStruct((batch, seq_len), np.float32 if k == "loss_mask"
                                        else np.int32, sharding=shard.batch) for k in names}
    rng = np.random.default_rng(0)
    host = {"inputs": rng.integers(0, 256, (batch, seq_len), dtype=np.int32),
            "targets": rng.integers(0, 256, (batch, seq_len), dtype=np.int32),
            "segment_ids": np.ones((batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
            "loss_mask": np.ones((batch, seq_len), np.float32)}
    return jax.device_put(host, shard.batch)


def memory(model_name: str, mesh_name: str) -> dict:
    mesh, params, tx, shard, step = _setup(model_name, mesh_name)
    opt_abstract = jax.eval_shape(tx.init, params)
    abstract = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             params, shard.params),
                jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             opt_abstract, shard.opt_state),
                _batch(shard, _BATCH.value, _SEQ_LEN.value, abstract=True))
    log(f"memory: {model_name} on {mesh_name} {dict(mesh.shape)}: compiling")
    compiled = step.lower(*abstract).compile()
    return {"model": model_name, "mesh": mesh_name, "mesh_shape": dict(mesh.shape),
            "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
            "param_bytes_per_device": _per_device_bytes(params, shard.params),
            "opt_state_bytes_per_device": _per_device_bytes(opt_abstract, shard.opt_state),
            "compiled": memory_fields(compiled)}


def throughput(model_name: str, mesh_name: str) -> dict:
    mesh, params, tx, shard, step = _setup(model_name, mesh_name)
    params = jax.device_put(params, shard.params)
    opt_state = jax.jit(tx.init, out_shardings=shard.opt_state)(params)
    batch = _batch(shard, _BATCH.value, _SEQ_LEN.value)
    state = {"params": params, "opt": opt_state}

    def one_step(batch):  # donated inputs: carry the state across calls
        state["params"], state["opt"], loss, _, _ = step(state["params"], state["opt"], batch)
        return loss

    log(f"throughput: {model_name} on {mesh_name} {dict(mesh.shape)}")
    rec, _ = compile_and_time(one_step, (batch,), repeats=_REPEATS.value, warmup=3)
    tokens = _BATCH.value * _SEQ_LEN.value
    return {"model": model_name, "mesh": mesh_name, "mesh_shape": dict(mesh.shape),
            "seconds": rec["seconds"], "tokens_per_sec": tokens / rec["seconds"]}


def _plot(report, path):
    rows = report["throughput"]
    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    meshes = sorted({r["mesh"] for r in rows}, key=[r["mesh"] for r in rows].index)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    mem = report["memory"]
    x = np.arange(len(mem))
    axes[0].bar(x - 0.2, [r["param_bytes_per_device"] / 2**20 for r in mem], 0.4,
                label="parameters")
    axes[0].bar(x + 0.2, [r["opt_state_bytes_per_device"] / 2**20 for r in mem], 0.4,
                label="AdamW state")
    axes[0].set(xticks=x, ylabel="MiB per device",
                title=f"{report['memory_model']} model: state per device")
    axes[0].set_xticklabels([r["mesh"] for r in mem], fontsize=8)
    axes[0].legend(fontsize=8)
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        vals = [next(r["ratio_to_single"] for r in rows if r["model"] == model and
                     r["mesh"] == m) for m in meshes]
        axes[1].bar(np.arange(len(meshes)) + i * width, vals, width, label=model)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set(xticks=np.arange(len(meshes)) + width * (len(models) - 1) / 2,
                ylabel="tokens/s vs one device", title="train step, 8 host devices (CPU)")
    axes[1].set_xticklabels(meshes, fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    if "single" not in _MESHES.value:
        raise app.UsageError("--meshes must include 'single' (the baseline)")
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "devices": jax.device_count(),
                          "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__},
              "memory_model": _MEMORY_MODEL.value, "batch": _BATCH.value,
              "seq_len": _SEQ_LEN.value, "memory": [], "throughput": []}
    for mesh in _MESHES.value:
        report["memory"].append(memory(_MEMORY_MODEL.value, mesh))
    for model in _THROUGHPUT_MODELS.value:
        rows = [throughput(model, mesh) for mesh in _MESHES.value]
        base = next(r for r in rows if r["mesh"] == "single")["tokens_per_sec"]
        for r in rows:
            r["ratio_to_single"] = r["tokens_per_sec"] / base
        report["throughput"] += rows
    emit(report, _OUT.value, _plot)


if __name__ == "__main__":
    app.run(main)
