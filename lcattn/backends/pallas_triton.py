"""The ``pallas_triton`` backend: ``pallas_kernels.gpu``'s Pallas Triton kernels (any CUDA GPU
from sm_80) as a pass: the block-sparse forward, and the dQ and dK/dV kernels as its
``custom_vjp``.

The fallback for GPUs without WGMMA: ``pallas_gpu`` (sm_90a kernels) hands its passes here on
any other GPU. Adapts ``streaming_attend``'s pass contract (``[B, T, H, D]``, prepared float32
q / k) to the kernel: heads first; q and k in ``OPERAND_DTYPE`` (bfloat16) except for
normalizers with ``amplifies_score_error`` (LSSAR), whose ``QKᵀ`` (and ``dS K``, ``dSᵀ Q``)
run on float32 operands in IEEE float32; ``P``, ``dO`` and v in bfloat16; float32
accumulation, statistics and gradients (the backward kernels recompute each visited tile from
the saved ``lse``). ``interpret=None``: Pallas interpret mode when not on a GPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcattn.backends.gpu_pass import cast_to, heads_first, kernel_args, kernel_pass
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.gpu import triton_backward, triton_forward

OPERAND_DTYPE = jnp.bfloat16


def pass_fn(block_sizes: BlockSizes | None = None, interpret=None):
    """A ``streaming_attend`` pass through the Triton kernels, tiled by ``block_sizes`` (the
    package default 512 x 512 means the kernels' own, ``triton_forward.DEFAULT_BLOCKS``)."""
    blocks = BlockSizes.of(block_sizes)
    tiles = None if blocks == BlockSizes() else blocks
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        exact = getattr(normalizer, "amplifies_score_error", False)
        cast = cast_to(OPERAND_DTYPE)
        where = kernel_args(q_pos, k_pos, q_seg, kv_seg, bias, block_sizes=tiles,
                            interpret=interpret, mask=mask, normalizer=normalizer,
                            pass_idx=pass_idx)
        return kernel_pass(triton_forward.flash_attention_pass,
                           triton_backward.flash_attention_bwd,
                           heads_first if exact else cast, cast, where)(q, k, v, ctx)

    return run
