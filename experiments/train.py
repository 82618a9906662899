r"""Train a decoder LM.

``python -m experiments.train --gin_file=... --gin.NAME=VALUE --workdir=DIR``.

Example (a tiny softmax+RoPE model on the embedded corpus, a minute or two on 2 CPU cores)::

    python -m experiments.train --gin_file=configs/base.gin --gin_file=configs/models/tiny.gin \
        --gin_file=configs/attention/softmax_rope.gin --workdir=runs/tiny_softmax_rope

The workdir receives ``config.gin`` (the operative config), ``run.json`` (training length and
steps, read by evaluation), ``corpus.json`` (corpus sha256 and
Python version), ``metrics.jsonl`` (one JSON object per logged step: ``step``, ``loss``,
``learning_rate``, ``grad_norm``, ``param_norm``, ``tokens_per_sec``, ``step_seconds`` and, on a
device whose peak FLOP/s is known, ``mfu``: ``experiments.tracking.speed``), ``tensorboard/``
(the same rows as TensorBoard scalars ``train/<key>``; an evaluation adds ``tensorboard/eval/``;
``experiments.tracking``), ``profile/`` (with ``train.profile_steps``: a ``jax.profiler`` trace),
``wandb/`` (with ``train.wandb_project``) and ``checkpoints/`` (orbax: parameters,
optimizer state, data-iterator state and RNG; periodic and final; the newest
``keep_checkpoints`` kept; each save is atomic and its files' CRC-32 recorded). Re-running the
same command resumes from the newest intact checkpoint (on any mesh; ``experiments.checkpoints``
says what happens to a damaged one); a resumed run writes the same losses as one that never
stopped (bitwise on CPU, on the same mesh). Configuration errors stop the run before any
checkpoint is read or written.

Sharded: ``--gin_file=configs/mesh/fsdp8.gin`` (any ``configs/mesh/*.gin``) trains over that
mesh; ``--multihost`` first calls ``jax.distributed.initialize()`` (README, "Sharded runs").
"""
from __future__ import annotations

if __name__ == "__main__":  # run the importable module, so gin sees one copy of each configurable
    from experiments.train import run

    run()
    raise SystemExit(0)

import dataclasses
import json
import logging
import os
import re
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import checkpoints, configurables, tracking
from experiments import data as data_lib
from experiments.data import DataConfig
from lcattn import checks, sharding
from lcattn import pretrained as pretrained_lib
from lcattn.backends import ring_plan
from lcattn.layers import Mamba2Config
from lcattn.memory import HMT, HMTConfig
from lcattn.model import DecoderLM

log = logging.getLogger("lcattn.train")
COMPUTE_DTYPES = ("float32", "bfloat16")
_GIN_NAMES = {Mamba2Config: "layers.Mamba2Config", HMTConfig: "memory.HMTConfig"}


@gin.configurable
def build_model(*, vocab_size: int = 256, d_model: int = 128, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int | None = None, head_dim: int | None = None,
                mlp_dim: int | None = None, layer_pattern=("attn",), attention_specs=None,
                tie_embeddings: bool = True, backend: str = "auto",
                mamba2: Mamba2Config | None = None, memory: HMTConfig | None = None,
                compute_dtype: str = "float32", remat: str | None = None,
                seed: int = 0, pretrained: str | None = None) -> DecoderLM | HMT:
    """A ``DecoderLM`` of ``num_layers`` layers (``lcattn.model``), optionally inside HMT.

    Defaults: ``num_kv_heads = num_heads``, ``head_dim = d_model // num_heads``,
    ``mlp_dim = 4 * d_model``.

    Args:
      layer_pattern: mixer names (``lcattn.model.MIXERS``: ``"attn"``, ``"mamba2"``) repeated
        up to ``num_layers`` (its length must divide ``num_layers``), e.g.
        ``("mamba2", "attn")``, so one mixer file fits every model size.
      attention_specs: None (``AttentionSpec()``), one ``AttentionSpec`` for every attention
        layer, or one entry per layer.
      backend: the attention layers' ``lcattn.attend`` backend (``lcattn.backends``).
      mamba2: sizes and state-collapse mitigations of the ``"mamba2"`` layers
        (``@layers.Mamba2Config()`` with ``options = @ssm.SSMOptions()``); None: the defaults.
        Its ``head_dim=None`` means as many SSM heads as attention heads. An evaluation can
        rebind ``ssm.SSMOptions`` on a trained checkpoint (training-free mitigations).
      memory: an ``lcattn.memory.HMTConfig`` wraps the decoder in ``lcattn.memory.HMT``
        (``configs/memory/hmt.gin``); None: the plain decoder. The decoder's parameters are
        drawn first, so they do not depend on it.
      compute_dtype: ``"float32"`` or ``"bfloat16"``: matmuls and activations; parameters
        stay float32, attention statistics, norm statistics and the loss float32.
      remat: None, or a ``jax.checkpoint_policies`` name (``lcattn.model.REMAT_POLICIES``,
        e.g. ``"nothing_saveable"``) to rematerialize each block in the backward pass.
      seed: parameter initialization.
      pretrained: a Hugging Face-format folder (``lcattn.pretrained.load``, float32
        parameters, ``compute_dtype`` matmuls) as the decoder instead of a new one: the size
        arguments, ``layer_pattern``, ``attention_specs``, ``tie_embeddings``, ``mamba2`` and
        ``remat`` are then the folder's, not these. With ``memory`` it is HMT's backbone
        (``configs/memory/hmt_pretrained.gin``; ``train.freeze`` keeps it fixed).
    """
    if pretrained is not None:
        checks.choice("build_model", "compute_dtype", compute_dtype, COMPUTE_DTYPES)
        if memory is not None and not isinstance(memory, HMTConfig):
            raise ValueError(f"build_model: `memory` must be None or a HMTConfig "
                             f"(@memory.HMTConfig()), got {memory!r}")
        model = pretrained_lib.load(pretrained, backend=backend, compute_dtype=compute_dtype)
        log.info("build_model: %s loaded (%d layers, d_model %d, vocab %d)", pretrained,
                 len(model.blocks), model.d_model, model.vocab_size)
        return model if memory is None else HMT(model, memory, rngs=nnx.Rngs(seed))
    checks.integer("build_model", "num_layers", num_layers)
    if d_model % num_heads:
        raise ValueError(f"build_model: d_model ({d_model}) must be divisible by num_heads "
                         f"({num_heads}) unless head_dim is given")
    if isinstance(layer_pattern, str) or not layer_pattern or num_layers % len(layer_pattern):
        raise ValueError(f"build_model: `layer_pattern` must be a non-empty tuple of mixer "
                         f"names whose length divides num_layers ({num_layers}), got "
                         f"{layer_pattern!r}")
    for name, value, kind in (("mamba2", mamba2, Mamba2Config), ("memory", memory, HMTConfig)):
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"build_model: `{name}` must be None or a {kind.__name__} "
                             f"(@{_GIN_NAMES[kind]}()), got {value!r}")
    checks.choice("build_model", "compute_dtype", compute_dtype, COMPUTE_DTYPES)
    rngs = nnx.Rngs(seed)
    model = DecoderLM(
        vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
        num_kv_heads=num_kv_heads or num_heads, head_dim=head_dim or d_model // num_heads,
        mlp_dim=4 * d_model if mlp_dim is None else mlp_dim,
        layer_pattern=tuple(layer_pattern) * (num_layers // len(layer_pattern)),
        attention_specs=attention_specs, tie_embeddings=tie_embeddings, backend=backend,
        mamba2=mamba2, dtype=jnp.dtype(compute_dtype), remat=remat, rngs=rngs)
    return model if memory is None else HMT(model, memory, rngs=rngs)


def split_model(model):
    """``(graphdef, param_state, rest, params)`` with ``params`` a pure dict of arrays."""
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, param_state, rest, nnx.to_pure_dict(param_state)


def merge_model(graphdef, param_state, rest, params):
    """The model with ``params`` (a pure dict) substituted; usable inside ``jit``."""
    state = jax.tree.map(lambda x: x, param_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)


def forward(model, batch, context_layout: str = "contiguous"):
    """``(logits [B, T, V], loss mask [B, T])`` of a training batch.

    A ``DecoderLM`` reads the batch's positions and segment ids (packed documents), with the
    batch in ``context_layout``'s order under a mesh that splits the sequence; an
    ``HMT`` reads each row as one stream through its segment recurrence and restricts the
    mask to the segments its ``loss_segments`` names.
    """
    if isinstance(model, HMT):
        return model(batch["inputs"]), model.loss_mask(batch["loss_mask"])
    logits = model(batch["inputs"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"], context_layout=context_layout)
    return logits, batch["loss_mask"]


def lm_loss(logits, batch):
    """Mean next-token cross-entropy over ``loss_mask``; logits ``[B, T, V]``."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _progress(step, num_steps, start, t0, loss, tokens_per_sec):
    done = step - start
    rate = done / max(time.perf_counter() - t0, 1e-9)
    eta = (num_steps - step) / max(rate, 1e-9)
    log.info("step %d/%d loss %.4f | %.2f steps/s %.0f tok/s | ETA %dm%02ds", step, num_steps,
             loss, rate, tokens_per_sec, eta // 60, eta % 60)


@dataclasses.dataclass(frozen=True)
class Shardings:
    """Where a training step's inputs and outputs live: ``params`` and ``opt_state`` (trees of
    ``NamedSharding``, from the logical-axis rules), ``batch`` and ``replicated``."""

    params: dict
    opt_state: Any
    batch: NamedSharding
    replicated: NamedSharding

    @classmethod
    def of(cls, param_state, params, tx, mesh: Mesh, rules) -> "Shardings":
        param_sh = sharding.param_shardings(param_state, mesh, rules)
        return cls(param_sh, sharding.opt_state_shardings(tx, params, param_sh, mesh),
                   sharding.batch_sharding(mesh, rules), NamedSharding(mesh, PartitionSpec()))


def init_params_from(source: str, params: dict, shardings: dict) -> dict:
    """``params`` (a pure dict) with every parameter that the newest checkpoint of the run in
    ``source`` also holds, at the same path, replaced by its value (placed by ``shardings``);
    the others keep theirs. A parameter of another shape is a ``ValueError`` naming it."""
    with checkpoints.manager(source) as manager:
        step, restored, _ = checkpoints.restore_newest(manager, ocp.args.Composite(
            params=ocp.args.StandardRestore()))
    if step is None:
        raise FileNotFoundError(f"train.init_from: no checkpoint under "
                                f"{checkpoints.directory(source)}")
    theirs = {tuple(map(str, k)): v for k, v in
              traverse_util.flatten_dict(restored.params).items()}
    ours = traverse_util.flatten_dict(params)
    flat_shardings = traverse_util.flatten_dict(shardings)
    out, taken = {}, 0
    for path, value in ours.items():
        other = theirs.get(tuple(map(str, path)))
        if other is None:
            out[path] = value
            continue
        if tuple(other.shape) != tuple(value.shape):
            raise ValueError(f"train.init_from: parameter {'.'.join(map(str, path))} has shape "
                             f"{tuple(other.shape)} in {source} (step {step}) but "
                             f"{tuple(value.shape)} in this model")
        out[path] = jax.device_put(np.asarray(other, value.dtype), flat_shardings[path])
        taken += 1
    log.info("init_from %s (step %d): %d of %d parameters restored, %d new, %d of theirs "
             "unused", source, step, taken, len(ours), len(ours) - taken, len(theirs) - taken)
    return traverse_util.unflatten_dict(out)


def make_train_step(graphdef, param_state, rest, tx, shard: Shardings,
                    context_layout: str = "contiguous", frozen: dict | None = None):
    """``step(params, opt_state, batch) -> (params, opt_state, loss, grad norm, param norm)``:
    one ``jax.jit`` with ``shard``'s in/out shardings, donating params and optimizer state.
    ``frozen``: a tree like ``params`` of bools (``frozen_labels``); those parameters come back
    unchanged, bit for bit, and the gradient norm covers the others only."""
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits, mask = forward(merge_model(graphdef, param_state, rest, p), batch,
                                   context_layout)
            return lm_loss(logits, dict(batch, loss_mask=mask))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        if frozen is not None:
            new = jax.tree.map(lambda f, old, p: old if f else p, frozen, params, new)
            grads = jax.tree.map(lambda f, g: None if f else g, frozen, grads)
        return new, opt_state, loss, optax.tree.norm(grads), optax.tree.norm(new)

    return jax.jit(step, in_shardings=(shard.params, shard.opt_state, shard.batch),
                   out_shardings=(shard.params, shard.opt_state) + (shard.replicated,) * 3,
                   donate_argnums=(0, 1))


def make_optimizer(schedule, weight_decay: float, grad_clip: float,
                   frozen: dict | None = None):
    """Global-norm clipping, then AdamW; with ``frozen`` (a tree like the parameters of
    bools) only over the parameters not frozen (``optax.multi_transform``: the frozen ones
    get zero updates and no optimizer state)."""
    tx = optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, weight_decay=weight_decay))
    if frozen is None:
        return tx
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def frozen_labels(params: dict, pattern: str | None) -> dict | None:
    """``train.freeze``: a tree like ``params`` marking each parameter whose dotted path
    (``backbone.blocks.0.attention.wq``) matches the regular expression ``pattern``
    (``re.search``); None for None. Matching no parameter, or all of them, is an error."""
    if pattern is None:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"train: `freeze` is not a regular expression ({err}): "
                         f"{pattern!r}") from err
    flat = traverse_util.flatten_dict(params)
    marks = {p: bool(regex.search(".".join(map(str, p)))) for p in flat}
    if not any(marks.values()) or all(marks.values()):
        examples = sorted(".".join(map(str, p)) for p in flat)[:4]
        raise ValueError(f"train: `freeze` = {pattern!r} matches "
                         f"{'no' if not any(marks.values()) else 'every'} parameter; it is a "
                         f"regular expression over dotted paths such as {examples}")
    log.info("freeze %r: %d of %d parameters frozen", pattern, sum(marks.values()), len(marks))
    return traverse_util.unflatten_dict(marks)


def place_batch(batch: dict, sharding_, batch_size: int) -> dict:
    """This host's rows of a batch -> global arrays sharded by ``sharding_``."""
    return {k: jax.make_array_from_process_local_data(sharding_, v, (batch_size,) + v.shape[1:])
            for k, v in batch.items()}


@gin.configurable
def train(workdir: str, *, data: DataConfig = DataConfig(), mesh: Mesh | None = None,
          num_steps: int = 300, batch_size: int = 16, seq_len: int = 128,
          learning_rate: float = 3e-3, warmup_steps: int = 30, end_lr_fraction: float = 0.1,
          weight_decay: float = 0.1, grad_clip: float = 1.0, checkpoint_every: int = 100,
          keep_checkpoints: int = 2, log_every: int = 10, seed: int = 0,
          stop_at_step: int | None = None, context_layout: str = "auto",
          init_from: str | None = None, freeze: str | None = None,
          tensorboard_dir: str | None = None, profile_steps=None,
          wandb_project: str | None = None) -> dict:
    """Train ``build_model()`` on ``data``'s training split; returns the last metrics.

    ``data``: the corpus and pipeline (``experiments.data.DataConfig``; gin:
    ``train.data = @data.DataConfig()``). ``mesh``: the device mesh
    (``lcattn.sharding.make_mesh``; gin: ``configs/mesh/*.gin``); None: one device.
    Parameters and optimizer moments are sharded by the logical-axis rules
    (``sharding.logical_rules.overrides`` in gin), batches over ``(data, fsdp)``; the step is
    one ``jax.jit`` with these in/out shardings, donating parameters and optimizer state.
    ``batch_size`` is global. ``context_layout``: with ``context > 1``, which tokens each
    device holds (``configurables.context_layout``; "auto": zigzag for Causal / Full masks):
    each batch is reordered once on the host (``ring_plan.layout_order``: tokens, positions,
    segment ids, targets, loss mask alike, so the loss is unchanged). ``stop_at_step``
    simulates a preemption: stop after that step without a final checkpoint. ``init_from``:
    another run's workdir; a fresh run starts from its newest checkpoint's parameters where
    both models have them (``init_params_from``; new ones keep their initialization, the
    optimizer starts fresh): HMT's second stage, or fine-tuning any checkpoint. A run that
    has its own checkpoint resumes from it instead. ``freeze``: a regular expression over
    dotted parameter paths (``frozen_labels``); the parameters it matches are not trained
    (no update, no optimizer state), e.g. ``"^backbone\\."`` trains only HMT's memory
    parameters around a pretrained backbone (``configs/memory/hmt_pretrained.gin``).

    Watching (``experiments.tracking``; process 0 writes): every ``metrics.jsonl`` row also goes
    to TensorBoard event files in ``tensorboard_dir`` (None: ``workdir/tensorboard``; a resumed
    run rewrites them from the rows it keeps) and, with ``wandb_project``, to a Weights & Biases
    run in ``workdir/wandb`` (optional dependency; ``WANDB_MODE=offline`` works).
    ``profile_steps=(START, END)`` records a ``jax.profiler`` trace of steps START..END
    (inclusive) into ``workdir/profile``; None (the default) costs nothing.
    """
    for name, value in (("num_steps", num_steps), ("batch_size", batch_size),
                        ("seq_len", seq_len), ("checkpoint_every", checkpoint_every),
                        ("keep_checkpoints", keep_checkpoints), ("log_every", log_every)):
        checks.integer("train", name, value)
    checks.positive("train", "learning_rate", learning_rate)
    if not 0 <= warmup_steps < num_steps:
        raise ValueError(f"train: `warmup_steps` must be in [0, num_steps={num_steps}), "
                         f"got {warmup_steps}")
    mesh = configurables.check_mesh("train", mesh)
    rules = configurables.axis_rules()
    sharding.check_batch(batch_size, seq_len, mesh, rules, "train")
    profiler = tracking.Profiler(profile_steps, os.path.join(workdir, "profile"))
    wandb = tracking.import_wandb(wandb_project) if jax.process_index() == 0 else None
    model = build_model()
    if not isinstance(data, DataConfig):
        raise ValueError(f"train: `data` must be a DataConfig (@data.DataConfig()), got "
                         f"{data!r}")
    vocab = (model.backbone if isinstance(model, HMT) else model).vocab_size
    if data.tokenizer is None and vocab != data_lib.VOCAB_SIZE:
        raise ValueError(f"train: the model's vocabulary has {vocab} tokens but the data are "
                         f"bytes ({data_lib.VOCAB_SIZE}); set data.DataConfig.tokenizer to the "
                         "folder whose tokenizer.json the model uses (a pretrained backbone's)")
    if isinstance(model, HMT) and data.packing != "chunk":
        raise ValueError(f"train: an HMT model reads each row as one stream; set "
                         f"data.DataConfig.packing = 'chunk' (got {data.packing!r}; "
                         "configs/memory/hmt.gin sets it)")
    iterator = data.iterator("train", seq_len=seq_len, batch_size=batch_size, seed=seed,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str())
        with open(os.path.join(workdir, "run.json"), "w") as f:
            json.dump({"seq_len": seq_len, "batch_size": batch_size, "num_steps": num_steps}, f)
        data_lib.write_manifest(workdir, data_lib.corpus_manifest(data))

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, num_steps, learning_rate * end_lr_fraction)
    graphdef, param_state, rest, params = split_model(model)
    frozen = frozen_labels(params, freeze)
    tx = make_optimizer(schedule, weight_decay, grad_clip, frozen)
    shard = Shardings.of(param_state, params, tx, mesh, rules)
    params = jax.device_put(params, shard.params)
    opt_state = jax.jit(tx.init, out_shardings=shard.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shard.replicated)
    layout = configurables.context_layout("train", context_layout, model, mesh)
    order = ring_plan.layout_order(layout, dict(mesh.shape)["context"], seq_len)
    train_step = make_train_step(graphdef, param_state, rest, tx, shard, layout, frozen)
    start = 0
    with checkpoints.manager(workdir, keep_checkpoints) as manager, jax.set_mesh(mesh), \
            sharding.use_rules(rules), profiler:
        step, restored, damaged = checkpoints.restore_newest(manager, ocp.args.Composite(
            params=ocp.args.StandardRestore(checkpoints.abstract(params)),
            opt_state=ocp.args.StandardRestore(checkpoints.abstract(opt_state)),
            rng=ocp.args.StandardRestore({"key": checkpoints.abstract(rng)}),
            data=ocp.args.JsonRestore()))
        checkpoints.set_aside(manager, workdir, damaged)
        if step is None and init_from is not None:
            params = init_params_from(init_from, params, shard.params)
        if step is not None:
            start, params, opt_state = step, restored.params, restored.opt_state
            rng = restored.rng["key"]
            iterator.set_state(data_lib.decode_state(restored.data))
            log.info("resumed from step %d in %s", start, manager.directory)
        metrics = tracking.MetricsLog(
            workdir, start, tensorboard_dir or os.path.join(workdir, "tensorboard"), wandb,
            wandb_project) if primary else None
        num_params, peak = sum(x.size for x in jax.tree.leaves(params)), tracking.peak_flops()

        def save(step):
            checkpoints.save(manager, step, ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                rng=ocp.args.StandardSave({"key": rng}),
                data=ocp.args.JsonSave(data_lib.encode_state(iterator.get_state()))))

        row, t0, t_last = {}, time.perf_counter(), time.perf_counter()
        for step in range(start + 1, num_steps + 1):
            batch = place_batch({k: v[:, order] for k, v in next(iterator).items()},
                                shard.batch, batch_size)
            profiler.before(step)
            params, opt_state, loss, gnorm, pnorm = train_step(params, opt_state, batch)
            profiler.after(step, (params, loss))
            log_now = step % log_every == 0 or step == num_steps
            save_now = step % checkpoint_every == 0 or step == num_steps
            if log_now or save_now:
                loss = float(loss)
                if not (np.isfinite(loss) and np.isfinite(float(pnorm))):
                    raise FloatingPointError(
                        f"training diverged at step {step} (loss {loss}, parameter norm "
                        f"{float(pnorm)}); nothing saved, the last good checkpoint is kept")
            if log_now:
                now = time.perf_counter()
                speed = tracking.speed(batch_size * seq_len, min(log_every, step - start),
                                       now - t_last, num_params, mesh.devices.size, peak)
                t_last = now
                row = {"step": step, "loss": loss, "learning_rate": float(schedule(step - 1)),
                       "grad_norm": float(gnorm), "param_norm": float(pnorm), **speed}
                if metrics is not None:
                    metrics.write(row)
                _progress(step, num_steps, start, t0, loss, speed["tokens_per_sec"])
            if save_now:
                save(step)
            if stop_at_step is not None and step >= stop_at_step:
                log.info("stopping at step %d (stop_at_step)", step)
                break
        manager.wait_until_finished()
        if metrics is not None:
            metrics.close()
    return row


def main(argv, bindings):
    del argv
    if not configurables.WORKDIR.value:
        raise app.UsageError("--workdir is required")
    configurables.init_distributed()
    configurables.parse(configurables.GIN_FILES.value, bindings)
    train(configurables.WORKDIR.value)


def run():
    configurables.setup_logging()
    argv, bindings = configurables.absl_argv_with_gin()
    app.run(lambda a: main(a, bindings), argv=argv)
