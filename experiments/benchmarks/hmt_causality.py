"""How much HMT's teacher-forced loss gains from the summary reading ahead (lcattn.memory).

Run (from the repository root), on a trained HMT workdir::

    PYTHONPATH=. python -m experiments.benchmarks.hmt_causality --workdir=runs/hmt_quick/hmt

HMT's recall query ``S_n`` reads the segment's first ``j`` tokens, so in a teacher-forced pass
the logits of positions ``p < j - 1`` use a summary that includes tokens after ``p``. This
script recomputes those logits strictly causally: for every segment after the first and every
``p < j - 1``, ``S_n`` is re-extracted from ``H_n[0:p+1]`` only, ``P_n`` recalled from the same
cache, and the segment re-run (one batched call per segment). Positions ``p >= j - 1`` and
the first segment are causal already. It checks itself against the model (the rebuilt
teacher-forced row ``p = j - 1`` equals ``HMT.process``; the batched prefix summaries equal
``HMT.summarize`` on the prefix) and prints one JSON object: the validation NLL of the first
``--num_sequences`` sequences of ``--length`` tokens, teacher-forced and strictly causal.
"""
from __future__ import annotations

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments import configurables, data
from experiments.benchmarks.timing import emit, log
from experiments.evaluate import restore_model
from lcattn.memory import HMT

_LENGTH = flags.DEFINE_integer("length", 2048, "Tokens per validation sequence.")
_NUM = flags.DEFINE_integer("num_sequences", 8, "Validation sequences.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")


def _prefix_logits(model: HMT, x, state, targets):
    """NLL ``[B, j]`` of positions ``0..j-1`` of one segment ``x [B, L, D]``, position ``p``
    recalled with the summary of ``x[:, :p+1]`` (``p = j - 1`` is the teacher-forced one)."""
    bb, j = model.backbone, model.config.summary_tokens
    b, _, d = x.shape
    p = jnp.arange(j)
    prompt = jnp.broadcast_to(model.summary_prompt[...].astype(x.dtype), (b, j, 1, d))
    rows = jnp.concatenate([prompt, jnp.broadcast_to(x[:, None, :j], (b, j, j, d))], axis=2)
    rows = jnp.concatenate([rows, prompt], axis=2)  # [T, x_0 .. x_{j-1}, T] per row
    closing = (jnp.arange(j + 2)[None, :] == p[:, None] + 2)[None, :, :, None]
    rows = jnp.where(closing, prompt, rows)  # row p: [T, x_0 .. x_p, T, <unseen: causal>]
    hidden = bb.forward_embeddings(rows.reshape(b * j, j + 2, d))
    summary = bb.final_norm(hidden[jnp.arange(b * j), jnp.tile(p, b) + 2])
    state = jax.tree.map(lambda a: jnp.repeat(a, j, axis=0), state)
    recalled = model.recall(summary, state)[:, None].astype(x.dtype)
    seq = jnp.concatenate([recalled, state.sensory, jnp.repeat(x, j, axis=0), recalled], axis=1)
    hidden = bb.forward_embeddings(seq)
    at = 1 + state.sensory.shape[1] + jnp.tile(p, b)
    logits = bb.logits(hidden[jnp.arange(b * j), at][:, None])[:, 0].reshape(b, j, -1)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets[:, :j]), summary


def main(argv):
    del argv
    configurables.setup_logging()
    workdir = configurables.WORKDIR.value
    configurables.parse([], [], run_config=os.path.join(workdir, "config.gin"))
    model, step = restore_model(workdir)
    if not isinstance(model, HMT) or not model.config.recall:
        raise app.UsageError("--workdir must hold an HMT model with recall=True")
    size, j = model.config.segment_len, model.config.summary_tokens
    length, num = _LENGTH.value, _NUM.value
    tokens = np.concatenate(data.validation_documents(gin.get_configurable(data.DataConfig)()))
    seqs = np.stack([tokens[i * length:(i + 1) * length + 1] for i in range(num)])
    inputs, targets = jnp.asarray(seqs[:, :-1]), jnp.asarray(seqs[:, 1:])
    graphdef, params = nnx.split(model)
    process = jax.jit(lambda p, x, s: nnx.merge(graphdef, p).process(x, s))
    prefix = jax.jit(lambda p, x, s, y: _prefix_logits(nnx.merge(graphdef, p), x, s, y))
    summarize = jax.jit(lambda p, x: nnx.merge(graphdef, p).summarize(x))
    teacher = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        process(params, inputs, None)[0], targets))
    causal, state = teacher.copy(), None
    for start in range(0, length, size):
        seg = inputs[:, start:start + size]
        if state is not None:
            x = model.backbone.embed(seg)
            nll, summary = prefix(params, x, state, targets[:, start:start + size])
            nll = np.asarray(nll)
            np.testing.assert_allclose(nll[:, -1], teacher[:, start + j - 1], atol=1e-3)
            np.testing.assert_allclose(summary.reshape(num, j, -1)[:, j // 2],
                                       summarize(params, x[:, :j // 2 + 1]), atol=1e-4)
            causal[:, start:start + j - 1] = nll[:, :-1]
        state = process(params, seg, state)[1]
    later = [slice(s, s + j - 1) for s in range(size, length, size)]
    result = {"workdir": os.path.abspath(workdir), "step": int(step), "length": length,
              "num_sequences": num, "segment_len": size, "summary_len": j,
              "teacher_forced": float(teacher.mean()), "strict_causal": float(causal.mean()),
              "first_positions_teacher_forced": float(np.mean([teacher[:, s] for s in later])),
              "first_positions_strict_causal": float(np.mean([causal[:, s] for s in later]))}
    log(f"teacher-forced {result['teacher_forced']:.5f} strict causal "
        f"{result['strict_causal']:.5f} nats/byte")
    emit(result, _OUT.value)


if __name__ == "__main__":
    app.run(main)
