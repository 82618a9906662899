"""Attention backends: ``reference`` (dense oracle) and ``xla`` (blockwise, block-sparse)."""
