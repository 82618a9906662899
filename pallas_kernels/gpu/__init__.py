"""Mosaic GPU (sm_90a) block-sparse flash attention, forward pass; see ``flash_attention``."""
from pallas_kernels.gpu.flash_attention import (
    DEFAULT_BLOCKS,
    DTYPES,
    HEAD_DIMS,
    check_inputs,
    flash_attention_pass,
    pack_lists,
)

__all__ = ["DEFAULT_BLOCKS", "DTYPES", "HEAD_DIMS", "check_inputs", "flash_attention_pass",
           "pack_lists"]
