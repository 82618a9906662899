r"""Evaluate a trained workdir or a pretrained model: loss vs length, per-position NLL, passkey.

``python -m experiments.evaluate --workdir=DIR [--gin_file=...] [--gin.NAME=VALUE]`` reads
``DIR/config.gin``, then the given files and bindings (so an evaluation-time change of the
attention, e.g. ``--gin_file=configs/attention/lminfinite.gin``, applies on top), restores the
newest checkpoint and writes into ``DIR`` (file stem ``evaluate.output_name``, default ``eval``):

* ``eval.json``: eval lengths, validation loss per length, passkey accuracy per length x depth;
* ``eval.zarr/`` (tensorstore): ``loss`` ``[lengths]``, ``nll_by_position`` ``[lengths, max_len]``
  (NaN past each length), ``passkey_accuracy`` ``[lengths, depths]``;
* ``eval_loss_vs_length.png``, ``eval_nll_vs_position.png``, ``eval_passkey.png``;
* ``tensorboard/eval/``: the losses (``loss/L_<length>``), passkey accuracies and figures as
  TensorBoard events at the checkpoint's training step, beside the run's training curves.

Validation text is the held-out files of the corpus, concatenated in order and cut into
sequences of each eval length (positions ``0..L-1``, one segment), so every length sees the
same text from its start.

Eval and passkey lengths are multiples of ``evaluate.length_unit`` (default: the training
length), or ``evaluate.lengths``. An HMT model (``configs/memory/hmt.gin``) runs every sequence
through its segment recurrence, and its default unit is the segment length, so 16x means 16
segments.

``--pretrained=PATH`` evaluates a Hugging Face-format folder instead (``lcattn.pretrained``;
``--workdir`` is where results go, no training run is read): the text is tokenized with the
folder's ``tokenizer.json``, the default unit is its ``max_position_embeddings`` (``SEQ_LEN`` is
bound to it, so ``configs/attention/lminfinite.gin`` sizes its window from it), an
``AttentionSpec`` override keeps the checkpoint's RoPE (``evaluate.keep_position``), and
``ssm.SSMOptions.*`` bindings apply to its Mamba-2 layers (training-free mitigations).
"""
from __future__ import annotations

if __name__ == "__main__":  # run the importable module, so gin sees one copy of each configurable
    from experiments.evaluate import run

    run()
    raise SystemExit(0)

import functools
import json
import logging
import os
import time

import gin
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import app
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import checkpoints, configurables, tasks, tracking
from experiments.data import DataConfig, encode_with, validation_documents
from experiments.tasks import Passkey
from experiments.train import build_model, merge_model, split_model
from lcattn import checks, memory, sharding
from lcattn import model as model_lib
from lcattn import pretrained as pretrained_lib
from lcattn.attention import AttentionSpec
from lcattn.backends import ring_plan

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("lcattn.evaluate")


def restore_model(workdir: str, mesh: Mesh | None = None, rules=None):
    """``build_model()`` (from the parsed gin config) with the newest readable checkpoint's
    parameters, placed on ``mesh`` (default: one device) by the logical-axis ``rules``."""
    mesh = mesh or sharding.single_device_mesh()
    model = build_model()
    graphdef, param_state, rest, params = split_model(model)
    target = checkpoints.abstract(params, sharding.param_shardings(param_state, mesh, rules))
    with checkpoints.manager(workdir) as manager:
        step, restored, _ = checkpoints.restore_newest(manager, ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoints.directory(workdir)}; "
                                "train first")
    return merge_model(graphdef, param_state, rest, restored.params), step


def _host(x) -> np.ndarray:
    """A global array as one numpy array on every process."""
    if jax.process_count() > 1:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _global(array: np.ndarray, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """A host array (the same on every process) as a global array sharded by ``spec``."""
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec),
                                        lambda index: array[index])


def nll_by_position(model, tokens, length, batch_size, attention_override, mesh=None,
                    context_layout: str = "contiguous"):
    """Mean NLL at each position ``[length]`` over sequences of ``length + 1`` tokens.

    Batches of ``batch_size`` sequences (the last one padded with zero-weight rows) are
    sharded over the batch axes of ``mesh`` (default: one device); with ``context > 1`` each
    sequence is reordered for ``context_layout`` (``ring_plan.layout_order``) and the curve
    put back in token order.
    """
    n = (len(tokens) - 1) // length
    if n < 1:
        raise ValueError(f"validation text ({len(tokens)} tokens) is shorter than eval length "
                         f"{length}")
    seqs = np.stack([tokens[i * length:(i + 1) * length + 1] for i in range(n)])
    graphdef, state = nnx.split(model)
    mesh = mesh or sharding.single_device_mesh()
    rows = sharding.batch_sharding(mesh).spec[0]
    order = ring_plan.layout_order(context_layout, dict(mesh.shape)["context"], length)
    kw = {} if context_layout == "contiguous" else dict(
        positions=jnp.asarray(order, jnp.int32), context_layout=context_layout)

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def nll(state, batch, weight):
        inputs, targets = batch[:, :-1][:, order], batch[:, 1:][:, order]
        logits = nnx.merge(graphdef, state)(inputs, attention_override=attention_override,
                                            **kw)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.zeros(length).at[order].set(jnp.sum(per_token * weight[:, None], axis=0))

    total = np.zeros(length)
    for i in range(0, n, batch_size):
        chunk = np.zeros((batch_size, length + 1), np.int32)
        weight = np.zeros(batch_size, np.float32)
        part = seqs[i:i + batch_size]
        chunk[:len(part)], weight[:len(part)] = part, 1.0
        total += _host(nll(state, _global(chunk, mesh, PartitionSpec(rows, None)),
                           _global(weight, mesh, PartitionSpec(rows))))
    return total / n


def passkey_accuracy(model, lengths, depths, trials, attention_override, seed=0,
                     tokenizer=None):
    """Fraction of greedy answers equal to the key, ``[len(lengths), len(depths)]``.

    The prompts of one length (every depth and trial) are decoded as one batch: a
    ``DecoderLM`` with its KV cache (``lcattn.model.generate``), an ``HMT`` through its
    segment recurrence (``lcattn.memory.generate``: the incomplete last segment is re-run for
    every answer token, so each token sees exactly the prompt and the tokens before it).
    Byte models must produce the answer's bytes exactly; with a ``tokenizer`` (pretrained
    models) the decoded continuation, leading spaces stripped, must start with the key.
    """
    generate = memory.generate if isinstance(model, memory.HMT) else model_lib.generate
    acc = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        examples = [tasks.passkey_example(length, depth, seed=seed + 1000 * i + 100 * j + t,
                                          tokenizer=tokenizer)
                    for j, depth in enumerate(depths) for t in range(trials)]
        prompts = jnp.asarray(np.stack([ex["prompt"] for ex in examples]), jnp.int32)
        out = _host(generate(model, prompts, len(examples[0]["answer"]),
                                  attention_override=attention_override))
        if tokenizer is None:
            hits = [np.array_equal(row, ex["answer"]) for row, ex in zip(out, examples)]
        else:
            hits = [tokenizer.decode(row.tolist()).lstrip().startswith(ex["key"])
                    for row, ex in zip(out, examples)]
        acc[i] = np.asarray(hits, float).reshape(len(depths), trials).mean(axis=1)
    return acc


def _write_zarr(path, name, array):
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                   "path": os.path.join(path, name)}},
                    create=True, delete_existing=True, dtype=ts.float32,
                    shape=array.shape).result()
    store.write(np.asarray(array, np.float32)).result()


def _plots(workdir, stem, lengths, losses, nll, depths, passkey, unit="byte"):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(lengths, losses, "o-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(x) for x in lengths])
    ax.minorticks_off()
    ax.set(xlabel="eval length (tokens)", ylabel=f"validation loss (nats/{unit})",
           title="loss vs length")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, f"{stem}_loss_vs_length.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for length, curve in zip(lengths, nll):
        ax.plot(np.arange(length), curve[:length], lw=0.8, label=f"L={length}")
    ax.set(xscale="log", xlabel="position", ylabel="NLL", title="NLL vs position")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, f"{stem}_nll_vs_position.png"), dpi=120)
    if passkey is not None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        im = ax.imshow(passkey.T, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set(xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)),
               yticklabels=depths, xlabel="prompt length", ylabel="depth", title="passkey")
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, f"{stem}_passkey.png"), dpi=120)
    plt.close("all")


def pretrained_tokens(data: DataConfig, tokenizer, max_tokens: int) -> np.ndarray:
    """``data``'s validation files (byte corpus; a single text file or any folder has one:
    file 0) tokenized by ``tokenizer`` (``data.encode_with``) and concatenated, stopping once
    ``max_tokens`` tokens are there."""
    out, total = [], 0
    for doc in validation_documents(data):
        out.append(encode_with(tokenizer, doc))
        total += len(out[-1])
        if total >= max_tokens:
            break
    return np.concatenate(out)[:max_tokens]


def _load_pretrained(path, dtype, mesh, rules, ssm_options, attention_override, keep_position):
    """``(model, tokenizer, length unit, override)`` of a pretrained folder."""
    model = pretrained_lib.load(path, dtype=dtype, mesh=mesh, rules=rules,
                                ssm_options=ssm_options)
    if isinstance(attention_override, AttentionSpec) and keep_position:
        attention_override = pretrained_lib.KeepPosition(attention_override)
    return model, pretrained_lib.load_tokenizer(path), pretrained_lib.max_positions(path), \
        attention_override


@gin.configurable
def evaluate(workdir: str, *, checkpoint_workdir: str | None = None,
             data: DataConfig = DataConfig(), mesh: Mesh | None = None,
             length_multipliers=(1, 2, 4, 8, 16), lengths=None,
             max_tokens: int = 65_536, batch_size: int = 8, attention_override=None,
             passkey: Passkey | None = Passkey(), length_unit: int | None = None,
             output_name: str = "eval", context_layout: str = "auto",
             pretrained: str | None = None, pretrained_dtype: str = "float32",
             ssm_options=None, keep_position: bool = True,
             tensorboard_dir: str | None = None) -> dict:
    """Evaluate the checkpoint of ``checkpoint_workdir`` (default ``workdir``), or the
    ``pretrained`` folder, into ``workdir``.

    Validation text comes from ``data`` (the run's corpus: ``evaluate.data`` and
    ``train.data`` are bound to the same ``@data.DataConfig()``). Eval and passkey lengths are
    multiples of ``length_unit``; None: the segment length of an HMT model (its long inputs run
    through the segment recurrence), else the training length (from the checkpoint's
    ``run.json``). ``max_tokens`` caps the validation text. ``passkey``: the passkey grid
    (``tasks.Passkey``), None or ``trials=0`` to skip it. ``mesh``: the device mesh
    (``configs/mesh/*.gin``; None: one device), whatever mesh the run trained on; parameters
    are placed by the logical-axis rules and ``batch_size`` sequences are sharded over the
    batch axes; with ``context > 1`` the sequence is split over ``context`` in
    ``context_layout`` ("auto": the model's choice, ``configurables.context_layout``). Only
    process 0 writes files. ``lengths``: explicit eval lengths instead of ``length_unit`` x
    ``length_multipliers``. ``tensorboard_dir``: where ``<output_name>/`` gets the results as
    TensorBoard events at the evaluated training step (``experiments.tracking.write_eval``;
    replaced on a re-run); None: ``workdir/tensorboard``.

    Pretrained models (``pretrained``: a Hugging Face-format folder, ``lcattn.pretrained``):
    ``pretrained_dtype`` is the parameter and compute dtype; ``ssm_options`` (an
    ``lcattn.ssm.SSMOptions``) the Mamba-2 mitigations; the default ``length_unit`` is the
    folder's ``max_position_embeddings``; with ``keep_position`` an ``AttentionSpec`` override
    keeps the checkpoint's RoPE (its theta and scaling) and changes the rest.
    """
    checks.integers("evaluate", "length_multipliers", length_multipliers)
    if lengths is not None:
        checks.integers("evaluate", "lengths", lengths)
    checks.integer("evaluate", "length_unit", length_unit, allow_none=True)
    if passkey is not None and not isinstance(passkey, Passkey):
        raise ValueError(f"evaluate: `passkey` must be None or a Passkey (@tasks.Passkey()), "
                         f"got {passkey!r}")
    mesh = configurables.check_mesh("evaluate", mesh)
    rules = configurables.axis_rules()
    sharding.check_batch(batch_size, None, mesh, rules, "evaluate")
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        t0 = time.perf_counter()
        tokenizer, step = None, None
        if pretrained is not None:
            model, tokenizer, unit, attention_override = _load_pretrained(
                pretrained, pretrained_dtype, mesh, rules, ssm_options, attention_override,
                keep_position)
            if length_unit is None and unit is None and lengths is None:
                raise ValueError(f"evaluate: {pretrained!r} has no max_position_embeddings; "
                                 "give evaluate.length_unit or evaluate.lengths")
            length_unit = length_unit or unit
        else:
            source = checkpoint_workdir or workdir
            with open(os.path.join(source, "run.json")) as f:
                train_seq_len = json.load(f)["seq_len"]
            model, step = restore_model(source, mesh, rules)
            if data.tokenizer is not None:   # trained on tokenized text (a pretrained backbone)
                tokenizer = pretrained_lib.load_tokenizer(data.tokenizer)
            if length_unit is None:
                length_unit = (model.config.segment_len if isinstance(model, memory.HMT)
                               else train_seq_len)
        lengths = list(lengths or [length_unit * m for m in length_multipliers])
        length_unit = length_unit or min(lengths)
        needed = max(max_tokens, max(lengths) + 1)
        if pretrained is not None and data.tokenizer is None:  # bytes -> the model's tokens
            tokens = pretrained_tokens(data, tokenizer, needed)
        else:   # the run's own tokens (bytes, or data.tokenizer's)
            tokens = np.concatenate(validation_documents(data))[:needed]
        nll = np.full((len(lengths), max(lengths)), np.nan)
        losses = []
        layout = configurables.context_layout("evaluate", context_layout, model, mesh,
                                              attention_override)
        for i, length in enumerate(lengths):
            curve = nll_by_position(model, tokens, length, batch_size, attention_override, mesh,
                                    layout)
            nll[i, :length] = curve
            losses.append(float(curve.mean()))
            log.info("L=%d loss %.4f (%.0fs)", length, losses[-1], time.perf_counter() - t0)
        grid = passkey if passkey is not None and passkey.trials else None
        accuracy, pk_lengths = None, [length_unit * m for m in (grid.multipliers if grid else ())]
        if grid:
            accuracy = passkey_accuracy(model, pk_lengths, list(grid.depths), grid.trials,
                                        attention_override, tokenizer=tokenizer)
    result = {"checkpoint": os.path.abspath(pretrained or checkpoint_workdir or workdir),
              "step": None if step is None else int(step),
              "pretrained": pretrained, "unit": "byte" if tokenizer is None else "token",
              "attention_override": repr(attention_override), "lengths": lengths,
              "length_unit": length_unit,
              "loss": {str(length): loss for length, loss in zip(lengths, losses)},
              "passkey": None if accuracy is None else {
                  "lengths": pk_lengths, "depths": list(grid.depths),
                  "accuracy": accuracy.tolist(), "trials": grid.trials},
              "seconds": time.perf_counter() - t0}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        zarr = os.path.join(workdir, f"{output_name}.zarr")
        _write_zarr(zarr, "loss", np.asarray(losses))
        _write_zarr(zarr, "nll_by_position", nll)
        if accuracy is not None:
            _write_zarr(zarr, "passkey_accuracy", accuracy)
        _plots(workdir, output_name, lengths, losses, nll, list(grid.depths) if grid else [],
               accuracy, result["unit"])
        with open(os.path.join(workdir, f"{output_name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        tracking.write_eval(
            os.path.join(tensorboard_dir or os.path.join(workdir, "tensorboard"), output_name),
            result, [os.path.join(workdir, f"{output_name}_{name}.png") for name in
                     ("loss_vs_length", "nll_vs_position") + (("passkey",) if grid else ())])
    return result


def main(argv, bindings):
    del argv
    if not configurables.WORKDIR.value:
        raise app.UsageError("--workdir is required")
    configurables.init_distributed()
    if configurables.PRETRAINED.value:
        configurables.parse(configurables.GIN_FILES.value,
                            configurables.pretrained_bindings(configurables.PRETRAINED.value)
                            + list(bindings))
        print(json.dumps(evaluate(configurables.WORKDIR.value), indent=1))
        return
    config = os.path.join(configurables.WORKDIR.value, "config.gin")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"--workdir: {config} not found; train first (or evaluate a "
                                "pretrained model with --pretrained=PATH)")
    configurables.parse(configurables.GIN_FILES.value, bindings, run_config=config)
    print(json.dumps(evaluate(configurables.WORKDIR.value), indent=1))


def run():
    configurables.setup_logging()
    argv, bindings = configurables.absl_argv_with_gin()
    app.run(lambda a: main(a, bindings), argv=argv)
