"""Mosaic TPU block-sparse flash attention (forward, dQ, dK/dV); see ``flash_attention``."""
from pallas_kernels.tpu.flash_attention import (DEFAULT_BLOCKS, Bias, block_shape,
                                                flash_attention_pass)

__all__ = ["DEFAULT_BLOCKS", "Bias", "block_shape", "flash_attention_pass"]
