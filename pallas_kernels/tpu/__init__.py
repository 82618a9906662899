"""Mosaic TPU block-sparse flash attention (forward, dQ, dK/dV); see ``flash_attention``."""
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.tpu.flash_attention import Bias, block_shape, flash_attention_pass

__all__ = ["BlockSizes", "Bias", "block_shape", "flash_attention_pass"]
