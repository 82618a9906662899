"""The ``pallas_tpu`` backend: ``pallas_kernels.tpu``'s block-sparse flash kernels as a pass.

Adapts ``streaming_attend``'s pass contract (layout ``[B, T, H, D]``, ALiBi as
``(q_bias_pos, k_bias_pos, slopes)``) to the kernel layout ``[B, H, T, D]``. Off TPU the
kernels run in TPU interpret mode (``interpret=None`` resolves to "not on a TPU").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcattn.positions import alibi_bias
from pallas_kernels import tpu
from pallas_kernels.block_sizes import BlockSizes


def resolve_interpret(interpret):
    """``interpret=None``: interpret mode unless running on a TPU; a ``pltpu.InterpretParams``
    passes through (it configures the interpreter)."""
    return jax.default_backend() != "tpu" if interpret is None else interpret


def pass_fn(block_sizes: BlockSizes | None = None, interpret=None):
    """A ``streaming_attend`` pass through the Mosaic TPU kernels, tiled by
    ``BlockSizes.of(block_sizes)`` (forward kernel: ``.forward``; dQ, dK/dV: ``.backward``)."""
    blocks = BlockSizes.of(block_sizes)
    interpret = resolve_interpret(interpret)

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        heads_first = lambda x: None if x is None else jnp.swapaxes(x, 1, 2)  # noqa: E731
        kernel_bias = None
        if bias is not None:
            qe, ke, slopes = bias
            kernel_bias = tpu.Bias(alibi_bias, qe, ke, slopes)
        out, lse = tpu.flash_attention_pass(
            heads_first(q), heads_first(k), heads_first(v),
            {n: jnp.swapaxes(c, 1, 2) for n, c in ctx.items()}, mask=mask,
            normalizer=normalizer, pass_idx=pass_idx, q_positions=q_pos, k_positions=k_pos,
            q_segment_ids=q_seg, kv_segment_ids=kv_seg, bias=kernel_bias,
            block_sizes=blocks, interpret=interpret)
        return heads_first(out), jnp.swapaxes(lse, 1, 2)

    return run
