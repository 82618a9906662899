"""Paper figures: one module per figure, data (``compute``) and drawing (``draw``) apart.

``python -m experiments.figures --figure=NAME|all [--preset=quick|paper] [--workdir=DIR]``
(default workdir ``runs/figures/<preset>``); see ``common.py`` for what a module defines and
writes. Runs are shared between figures through ``DIR/runs/`` and never retrained.
"""
from __future__ import annotations

import importlib

# name -> module under experiments.figures, in the order --figure=all draws them
FIGURES = {
    "lminfinite_nll": "lminfinite_nll",          # 1. LM-Infinite: NLL vs position
    "lminfinite_diagnosis": "lminfinite_diagnosis",  # 2. its Fig. 1: logits, entropy, PCA
    "lssar_extrapolation": "lssar_extrapolation",    # 3. LSSAR's length-extrapolation table
    "state_collapse": "state_collapse",          # 4. Stuffed Mamba: loss by train length, passkey
    "hmt_segments": "hmt_segments",              # 5. HMT: loss vs number of segments
    "mask_sparsity": "mask_sparsity",            # 6. masks and block sparsity (no training)
}


def load(name: str):
    """The figure module called ``name`` (clear error for an unknown one)."""
    if name not in FIGURES:
        raise ValueError(f"figures: unknown --figure {name!r}; choose one of "
                         f"{sorted(FIGURES)} or 'all'")
    return importlib.import_module(f"experiments.figures.{FIGURES[name]}")
