"""The ``pallas_triton`` backend: ``pallas_kernels.gpu.triton_forward``'s block-sparse forward
(Pallas Triton, any CUDA GPU from sm_80) as a pass; gradients through the ``xla`` pass.

The fallback for GPUs without WGMMA: ``pallas_gpu`` (sm_90a kernels) hands its passes here on
any other GPU. Adapts ``streaming_attend``'s pass contract (``[B, T, H, D]``, prepared float32
q / k) to the kernel: heads first; q and k in ``OPERAND_DTYPE`` (bfloat16) except for
normalizers with ``amplifies_score_error`` (LSSAR), whose ``QKᵀ`` runs on float32 operands in
IEEE float32; ``P`` and v in bfloat16 for ``PV``; float32 accumulation and statistics.

Backward: a ``custom_vjp`` whose gradient is ``jax.vjp`` of the ``xla`` pass on the same
inputs (it recomputes the forward blockwise): exact float32 gradients at the ``xla`` pass's
cost. ``interpret=None``: Pallas interpret mode when not on a GPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcattn.backends import xla
from lcattn.positions import alibi_bias
from lcattn.sharding import varying_like
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.gpu import triton_forward
from pallas_kernels.protocols import Bias

OPERAND_DTYPE = jnp.bfloat16


def pass_fn(block_sizes: BlockSizes | None = None, interpret=None):
    """A ``streaming_attend`` pass: the Triton forward tiled by ``block_sizes.forward`` (the
    package default 512 x 512 means the kernel's own, ``triton_forward.DEFAULT_BLOCKS``), the
    ``xla`` pass (tiled by ``block_sizes``) for gradients."""
    blocks = BlockSizes.of(block_sizes)
    tiles = None if blocks == BlockSizes() else blocks
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    fallback = xla.pass_fn(blocks)

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        kw = dict(mask=mask, normalizer=normalizer, pass_idx=pass_idx)
        ints = (q_pos, k_pos, q_seg, kv_seg)
        exact = getattr(normalizer, "amplifies_score_error", False)
        first = lambda x: None if x is None else jnp.swapaxes(x, 1, 2)  # noqa: E731
        cast = lambda x: None if x is None else first(x).astype(OPERAND_DTYPE)  # noqa: E731
        qk = first if exact else cast
        where = dict(q_positions=q_pos, k_positions=k_pos, q_segment_ids=q_seg,
                     kv_segment_ids=kv_seg, block_sizes=tiles, interpret=interpret,
                     bias=None if bias is None else Bias(alibi_bias, *bias), **kw)

        def kernel(q, k, v, ctx):
            out, lse = triton_forward.flash_attention_pass(
                qk(q), qk(k), cast(v), {n: first(c) for n, c in ctx.items()}, **where)
            return varying_like((first(out), jnp.swapaxes(lse, 1, 2)), q, k, v, ctx)

        @jax.custom_vjp
        def attend_pass(q, k, v, ctx):
            return kernel(q, k, v, ctx)

        def forward(q, k, v, ctx):
            return kernel(q, k, v, ctx), (q, k, v, ctx)

        def backward(res, cts):
            _, vjp = jax.vjp(lambda *a: fallback(*a, *ints, bias, **kw), *res)
            return vjp(cts)

        attend_pass.defvjp(forward, backward)
        return attend_pass(q, k, v, ctx)

    return run
