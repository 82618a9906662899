"""Generic block-sparse attention machinery; knows nothing of lcattn (see protocols.py)."""
