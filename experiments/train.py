r"""Train a decoder LM: ``python -m experiments.train --gin_file=... --gin.NAME=VALUE --workdir=DIR``.

Example (a tiny softmax+RoPE model on the embedded corpus, a minute or two on 2 CPU cores)::

    python -m experiments.train --gin_file=configs/base.gin --gin_file=configs/models/tiny.gin \
        --gin_file=configs/attention/softmax_rope.gin --workdir=runs/tiny_softmax_rope

The workdir receives ``config.gin`` (the operative config), ``run.json`` (training length and
steps, read by evaluation), ``corpus.json`` (corpus sha256 and
Python version), ``metrics.jsonl`` (one JSON object per logged step: ``step``, ``loss``,
``learning_rate``, ``grad_norm``, ``tokens_per_sec``) and ``checkpoints/`` (orbax: parameters,
optimizer state, data-iterator state and RNG; periodic and final; the newest
``keep_checkpoints`` kept; each save is atomic). Re-running the same command resumes from the
newest checkpoint; a resumed run writes the same losses as one that never stopped (bitwise on
CPU). Configuration errors stop the run before any checkpoint is read or written.
"""
from __future__ import annotations

if __name__ == "__main__":  # run the importable module, so gin sees one copy of each configurable
    from experiments.train import run

    run()
    raise SystemExit(0)

import inspect
import json
import logging
import os
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app
from flax import nnx

from experiments import configurables, data
from lcattn.layers import Mamba2Config
from lcattn.memory import HMT, HMTConfig
from lcattn.model import DecoderLM
from lcattn.ssm import SSMOptions

log = logging.getLogger("lcattn.train")


@gin.configurable
def build_model(*, vocab_size: int = 256, d_model: int = 128, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int | None = None, head_dim: int | None = None,
                mlp_dim: int | None = None, layer_pattern=None, layer_cycle=None,
                attention_spec=None, attention_specs=None, tie_embeddings: bool = True,
                backend: str = "auto", mamba2_head_dim: int | None = None,
                mamba2_state_dim: int = 64, mamba2_expand: int = 2, mamba2_num_groups: int = 1,
                mamba2_conv_width: int = 4, mamba2_chunk_size: int = 64,
                mamba2_impl: str = "auto", ssm_decay_scale: float = 1.0,
                ssm_input_scale: float = 1.0, ssm_input_clip: float | None = None,
                ssm_state_clip: float | None = None, ssm_window: int | None = None,
                memory: HMTConfig | None = None, seed: int = 0) -> DecoderLM | HMT:
    """A ``DecoderLM``; ``attention_spec`` applies to every attention layer unless
    ``attention_specs`` gives one per layer. Defaults: ``head_dim = d_model // num_heads``,
    ``mlp_dim = 4 * d_model``, ``layer_pattern = ("attn",) * num_layers``.

    ``layer_cycle`` (instead of ``layer_pattern``) repeats a short pattern to ``num_layers``
    layers, e.g. ``("mamba2", "attn")``, so one mixer file fits every model size.
    ``mamba2_*`` size the ``"mamba2"`` layers (``lcattn.layers.Mamba2Config``;
    ``mamba2_head_dim`` defaults to ``mamba2_expand * d_model // num_heads``, i.e. as many SSM
    heads as attention heads) and ``ssm_*`` are the training-free state-collapse mitigations
    (``lcattn.ssm.SSMOptions``: ``decay_scale``, ``input_scale``, ``input_clip``,
    ``state_clip``, ``window``), so an evaluation can rebind them on a trained checkpoint.

    ``memory``: an ``lcattn.memory.HMTConfig`` wraps the decoder in ``lcattn.memory.HMT``
    (segment recurrence with hierarchical memory; ``configs/memory/hmt.gin``); None: the
    plain decoder. The decoder's parameters are drawn first, so they do not depend on it.
    """
    if d_model % num_heads:
        raise ValueError(f"build_model: d_model ({d_model}) must be divisible by num_heads "
                         f"({num_heads}) unless head_dim is given")
    if layer_cycle is not None:
        if layer_pattern is not None:
            raise ValueError("build_model: give `layer_pattern` or `layer_cycle`, not both")
        if isinstance(layer_cycle, str) or not layer_cycle or num_layers % len(layer_cycle):
            raise ValueError(f"build_model: `layer_cycle` must be a non-empty tuple of mixer "
                             f"names whose length divides num_layers ({num_layers}), got "
                             f"{layer_cycle!r}")
        layer_pattern = tuple(layer_cycle) * (num_layers // len(layer_cycle))
    if mamba2_head_dim is None:
        if (mamba2_expand * d_model) % num_heads:
            raise ValueError(f"build_model: mamba2_expand * d_model ({mamba2_expand * d_model})"
                             f" must be divisible by num_heads ({num_heads}) unless "
                             "mamba2_head_dim is given")
        mamba2_head_dim = mamba2_expand * d_model // num_heads
    options = SSMOptions(decay_scale=ssm_decay_scale, input_scale=ssm_input_scale,
                         input_clip=ssm_input_clip, state_clip=ssm_state_clip,
                         window=ssm_window)
    mamba2 = Mamba2Config(head_dim=mamba2_head_dim, state_dim=mamba2_state_dim,
                          expand=mamba2_expand, num_groups=mamba2_num_groups,
                          conv_width=mamba2_conv_width, chunk_size=mamba2_chunk_size,
                          options=options, impl=mamba2_impl)
    if memory is not None and not isinstance(memory, HMTConfig):
        raise ValueError(f"build_model: `memory` must be None or an HMTConfig "
                         f"(@memory.HMTConfig()), got {memory!r}")
    rngs = nnx.Rngs(seed)
    model = DecoderLM(
        vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
        num_kv_heads=num_kv_heads or num_heads, head_dim=head_dim or d_model // num_heads,
        mlp_dim=mlp_dim or 4 * d_model,
        layer_pattern=tuple(layer_pattern or ("attn",) * num_layers),
        attention_specs=attention_specs if attention_specs is not None else attention_spec,
        tie_embeddings=tie_embeddings, backend=backend, mamba2=mamba2, rngs=rngs)
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


def forward(model, batch):
    """``(logits [B, T, V], loss mask [B, T])`` of a training batch.

    A ``DecoderLM`` reads the batch's positions and segment ids (packed documents); an
    ``HMT`` reads each row as one stream through its segment recurrence and restricts the
    mask to the segments its ``loss_segments`` names.
    """
    if isinstance(model, HMT):
        return model(batch["inputs"]), model.loss_mask(batch["loss_mask"])
    logits = model(batch["inputs"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"])
    return logits, batch["loss_mask"]


def lm_loss(logits, batch):
    """Mean next-token cross-entropy over ``loss_mask``; logits ``[B, T, V]``."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_positive(**values):
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"train: `{name}` must be > 0, got {value!r}")


class _Metrics:
    """``metrics.jsonl``, truncated to ``step <= start`` when a run resumes."""

    def __init__(self, path: str, start: int):
        self.path = path
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
        with open(path, "w") as f:
            f.writelines(rows)

    def write(self, row: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _progress(step, num_steps, start, t0, loss, tokens_per_sec):
    done = step - start
    rate = done / max(time.perf_counter() - t0, 1e-9)
    eta = (num_steps - step) / max(rate, 1e-9)
    log.info("step %d/%d loss %.4f | %.2f steps/s %.0f tok/s | ETA %dm%02ds", step, num_steps,
             loss, rate, tokens_per_sec, eta // 60, eta % 60)


@gin.configurable
def train(workdir: str, *, num_steps: int = 300, batch_size: int = 16, seq_len: int = 128,
          learning_rate: float = 3e-3, warmup_steps: int = 30, end_lr_fraction: float = 0.1,
          weight_decay: float = 0.1, grad_clip: float = 1.0, checkpoint_every: int = 100,
          keep_checkpoints: int = 2, log_every: int = 10, seed: int = 0,
          stop_at_step: int | None = None) -> dict:
    """Train ``build_model()`` on ``data.make_iterator("train", ...)``; returns the last metrics.

    ``stop_at_step`` simulates a preemption: stop after that step without a final checkpoint.
    """
    _check_positive(num_steps=num_steps, batch_size=batch_size, seq_len=seq_len,
                    learning_rate=learning_rate, checkpoint_every=checkpoint_every,
                    keep_checkpoints=keep_checkpoints, log_every=log_every)
    if not 0 <= warmup_steps < num_steps:
        raise ValueError(f"train: `warmup_steps` must be in [0, num_steps={num_steps}), "
                         f"got {warmup_steps}")
    model = build_model()
    if isinstance(model, HMT):
        packing = gin.get_bindings(data.make_iterator).get(
            "packing", inspect.signature(data.make_iterator).parameters["packing"].default)
        if packing != "chunk":
            raise ValueError(f"train: an HMT model reads each row as one stream; set "
                             f"make_iterator.packing = 'chunk' (got {packing!r}; "
                             "configs/memory/hmt.gin sets it)")
    iterator = data.make_iterator("train", seq_len=seq_len, batch_size=batch_size, seed=seed)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump({"seq_len": seq_len, "batch_size": batch_size, "num_steps": num_steps}, f)
    data.write_manifest(workdir, data.corpus_manifest())

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, num_steps, learning_rate * end_lr_fraction)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, weight_decay=weight_decay))
    graphdef, param_state, rest, params = split_model(model)
    opt_state = tx.init(params)
    rng = jax.random.key_data(jax.random.key(seed))

    @jax.jit
    def train_step(params, opt_state, batch):
        def loss_fn(p):
            logits, mask = forward(merge_model(graphdef, param_state, rest, p), batch)
            return lm_loss(logits, dict(batch, loss_mask=mask))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, optax.tree.norm(grads), optax.tree.norm(params)

    options = ocp.CheckpointManagerOptions(max_to_keep=keep_checkpoints, create=True,
                                           enable_async_checkpointing=False)
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    start = 0
    with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
        if manager.latest_step() is not None:
            start = manager.latest_step()
            restored = manager.restore(start, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params),
                opt_state=ocp.args.StandardRestore(opt_state),
                rng=ocp.args.StandardRestore({"key": rng}), data=ocp.args.JsonRestore()))
            params, opt_state = restored.params, restored.opt_state
            rng = restored.rng["key"]
            iterator.set_state(data.decode_state(restored.data))
            log.info("resumed from step %d in %s", start, ckpt_dir)
        metrics = _Metrics(os.path.join(workdir, "metrics.jsonl"), start)

        def save(step):
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                rng=ocp.args.StandardSave({"key": rng}),
                data=ocp.args.JsonSave(data.encode_state(iterator.get_state()))))

        row, t0, t_last = {}, time.perf_counter(), time.perf_counter()
        for step in range(start + 1, num_steps + 1):
            batch = {k: jnp.asarray(v) for k, v in next(iterator).items()}
            params, opt_state, loss, gnorm, pnorm = train_step(params, opt_state, batch)
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
                tps = batch_size * seq_len * min(log_every, step - start) / (now - t_last)
                t_last = now
                row = {"step": step, "loss": loss, "learning_rate": float(schedule(step - 1)),
                       "grad_norm": float(gnorm), "tokens_per_sec": tps}
                metrics.write(row)
                _progress(step, num_steps, start, t0, loss, tps)
            if save_now:
                save(step)
            if stop_at_step is not None and step >= stop_at_step:
                log.info("stopping at step %d (stop_at_step)", step)
                break
        manager.wait_until_finished()
    return row




def main(argv, bindings):
    del argv
    if not configurables.WORKDIR.value:
        raise app.UsageError("--workdir is required")
    configurables.parse(configurables.GIN_FILES.value, bindings)
    train(configurables.WORKDIR.value)


def run():
    configurables.setup_logging()
    argv, bindings = configurables.absl_argv_with_gin()
    app.run(lambda a: main(a, bindings), argv=argv)
