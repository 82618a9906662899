"""``python -m experiments.figures --figure=NAME|all [--preset=quick|paper] [--workdir=DIR]``."""
from __future__ import annotations

import os
import time

import jax
from absl import app, flags

from experiments import configurables
from experiments.figures import FIGURES, common, load

FIGURE = flags.DEFINE_string("figure", "all", f"one of {sorted(FIGURES)} or 'all'")
PRESET = flags.DEFINE_enum("preset", "quick", sorted(common.SCALES),
                           "quick: CPU, minutes; paper: one H100/H200")


def main(argv):
    del argv
    names = list(FIGURES) if FIGURE.value == "all" else [FIGURE.value]
    modules = [load(name) for name in names]
    workdir = configurables.WORKDIR.value or os.path.join("runs", "figures", PRESET.value)
    # The runs of a figure compile the same programs per seed and per variant: keep them.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    t0 = time.perf_counter()
    for i, module in enumerate(modules):
        common.log.info("[%d/%d] figure %s (%.0fs elapsed)", i + 1, len(modules), module.NAME,
                        time.perf_counter() - t0)
        common.make(module, PRESET.value, workdir)
    common.log.info("figures done in %.0fs: %s", time.perf_counter() - t0, workdir)


if __name__ == "__main__":
    configurables.setup_logging()
    app.run(main)
