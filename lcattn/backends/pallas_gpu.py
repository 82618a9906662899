"""The ``pallas_gpu`` backend: ``pallas_kernels.gpu``'s Mosaic GPU (sm_90a) kernels as a pass:
the forward kernel, and the dQ and dK/dV kernels as its ``custom_vjp``.

Adapts ``streaming_attend``'s pass contract (``[B, T, H, D]``, prepared float32 q / k) to the
kernel: heads first, and every matmul operand in ``OPERAND_DTYPE`` (bfloat16: WGMMA takes
bf16 / fp16 operands) with float32 accumulation and float32 softmax statistics. So a float32
model loses precision against the float32 reference here: q after the normalizer's scaling
(LSSA: ``log(d) log(N_i)`` times a unit vector) and k are rounded to bf16 before ``QKᵀ``,
``P`` before ``PV``. A normalizer with ``amplifies_score_error`` (LSSAR, whose power p = 15
turns bf16 score rounding into ~10 % gradient errors) gets ``split_qk``: float32 q and k,
split by the kernel entry into bf16 halves, ``QKᵀ`` as three WGMMAs (16 mantissa bits).
``interpret=None``: the Mosaic GPU interpreter when not on a GPU.

The backward kernels (``pallas_kernels.gpu.backward``) recompute each visited tile from the
saved ``lse``; they accumulate in float32 and round dQ / dK / dV once to bf16 (returned as
float32), like FlashAttention. LSSA's visible-key counting pass (one head, only when
positions are not the default; never differentiated) runs through the forward kernel too.
ALiBi (``(q_bias_pos, k_bias_pos, slopes)``) goes to the kernels as a ``protocols.Bias`` of
``lcattn.positions.alibi_bias``, added to ``QKᵀ`` in float32.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from lcattn.backends import pallas_triton
from lcattn.backends.gpu_pass import cast_to, heads_first, kernel_args, kernel_pass
from pallas_kernels import gpu
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.gpu.backward import flash_attention_bwd
from pallas_kernels.gpu.flash_attention import compute_capability

OPERAND_DTYPE = jnp.bfloat16
log = logging.getLogger("lcattn.backends.pallas_gpu")


def resolve_interpret(interpret):
    """``interpret=None``: the Mosaic GPU interpreter unless running on a GPU."""
    return jax.default_backend() != "gpu" if interpret is None else interpret


def pass_fn(block_sizes: BlockSizes | None = None, interpret=None):
    """A ``streaming_attend`` pass through the Mosaic GPU kernels, tiled by ``block_sizes``
    (the package-wide default 512 x 512 means the kernels' defaults, 128 x 128 forward and
    64 x 128 backward: their tiles are at most 256 x 256). On a GPU other than sm_90 (no
    WGMMA): ``pallas_triton``'s pass instead, with a logged warning."""
    blocks = BlockSizes.of(block_sizes)
    tiles = None if blocks == BlockSizes() else blocks
    interpret = resolve_interpret(interpret)
    if not interpret and compute_capability() not in (None, "9.0"):
        log.warning("backend='pallas_gpu': the Mosaic kernels need sm_90a, this GPU is "
                    "compute capability %s; running backend='pallas_triton' (Pallas Triton "
                    "kernels) instead", compute_capability())
        return pallas_triton.pass_fn(block_sizes, interpret)

    def run(q, k, v, ctx, q_pos, k_pos, q_seg, kv_seg, bias, *, mask, normalizer, pass_idx):
        split = getattr(normalizer, "amplifies_score_error", False)
        cast = cast_to(OPERAND_DTYPE)
        where = kernel_args(q_pos, k_pos, q_seg, kv_seg, bias, block_sizes=tiles,
                            interpret=interpret, split_qk=split, mask=mask,
                            normalizer=normalizer, pass_idx=pass_idx)
        # split_qk: float32 q, k, split into bf16 halves in the kernels' entry
        return kernel_pass(gpu.flash_attention_pass, flash_attention_bwd,
                           heads_first if split else cast, cast, where)(q, k, v, ctx)

    return run
