r"""The main job: train and evaluate a set of gin variants, then tabulate length generalization.

``python -m experiments.sweep [--gin_file=configs/sweeps/quick.gin] [--gin.NAME=VALUE]
[--workdir=DIR]`` (default sweep ``configs/sweeps/quick.gin``, default workdir
``runs/<sweep name>``). For each variant ``V`` of ``sweep.variants`` (a dict
``name -> {"gin": [files], "bindings": [...], "checkpoint_from": name | None,
"init_from": name | None}``) the config is
``sweep.base_gin`` + the variant's files + the command line's ``--gin_file``s (e.g. a mesh,
``configs/mesh/dp8.gin``) + its bindings + the command line's ``--gin.`` bindings;
``DIR/V`` is trained with ``experiments.train.train`` (or, with ``checkpoint_from``, the named
variant's checkpoint is reused — LM-Infinite needs no training; with ``init_from``, training
starts from an earlier variant's parameters, ``train.init_from``) and evaluated with
``experiments.evaluate.evaluate``. With ``--pretrained=PATH`` (a Hugging Face-format folder)
nothing is trained: every variant evaluates that model under its own attention override or
SSM options (``configs/sweeps/pretrained.gin``). Finished variants (``DIR/V/eval.json``
present) are skipped, and interrupted training resumes. Outputs in ``DIR``: ``results.json``
(variant -> eval length -> loss), ``results.md``, ``length_generalization.png`` and
``per_position.png``; ``tensorboard/<V>/`` (training curves) and ``tensorboard/<V>/eval/``
(evaluation), so ``tensorboard --logdir DIR`` overlays the variants.
"""
from __future__ import annotations

if __name__ == "__main__":  # run the importable module, so gin sees one copy of each configurable
    from experiments.sweep import run

    run()
    raise SystemExit(0)

import json
import logging
import os
import time

import gin
import jax
import matplotlib
import numpy as np
import tensorstore as ts
from absl import app

from experiments import configurables
from experiments.evaluate import evaluate
from experiments.train import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("lcattn.sweep")
DEFAULT_SWEEP = "configs/sweeps/quick.gin"


def _variant_config(base_gin, variant: dict, extra_files, extra_bindings):
    files = list(base_gin) + list(variant.get("gin", ())) + list(extra_files)
    configurables.parse(files, list(variant.get("bindings", ())) + list(extra_bindings))


def run_variant(name: str, variant: dict, variants: dict, base_gin, workdir: str,
                extra_bindings, extra_files=()):
    """Train (unless ``checkpoint_from``) and evaluate one variant into ``workdir/name``."""
    vdir = os.path.join(workdir, name)
    tensorboard = os.path.join(workdir, "tensorboard", name)  # one TensorBoard run per variant
    unknown = set(variant) - {"gin", "bindings", "checkpoint_from", "init_from"}
    if unknown:
        raise ValueError(f"sweep.variants[{name!r}]: unknown keys {sorted(unknown)}; allowed: "
                         "gin, bindings, checkpoint_from, init_from")
    start = variant.get("init_from")
    if start is not None:   # train from an earlier variant's parameters (HMT's stage 2)
        earlier = list(variants)[:list(variants).index(name)]
        if start not in earlier:
            raise ValueError(f"sweep.variants[{name!r}].init_from: {start!r} is not an "
                             f"earlier variant; earlier: {earlier}")
        variant = dict(variant, bindings=list(variant.get("bindings", ())) + [
            f"train.init_from = {os.path.join(workdir, start)!r}"])
    source = variant.get("checkpoint_from")
    if source is not None and source not in variants:
        raise ValueError(f"sweep.variants[{name!r}].checkpoint_from: {source!r} is not a "
                         f"variant; variants: {sorted(variants)}")
    _variant_config(base_gin, variant, extra_files, extra_bindings)
    pretrained = gin.query_parameter("evaluate.pretrained") if _bound("evaluate.pretrained") \
        else None
    if pretrained is not None and source is not None:
        raise ValueError(f"sweep.variants[{name!r}].checkpoint_from: a pretrained sweep "
                         "evaluates one model (--pretrained); remove checkpoint_from")
    if source is None and pretrained is None:
        train(vdir, tensorboard_dir=tensorboard)
        _variant_config(base_gin, variant, extra_files, extra_bindings)
    os.makedirs(vdir, exist_ok=True)
    with open(os.path.join(vdir, "variant.gin"), "w") as f:
        f.write(gin.config_str())
    return evaluate(vdir, checkpoint_workdir=None if source is None
                    else os.path.join(workdir, source), tensorboard_dir=tensorboard)


def _bound(name: str) -> bool:
    try:
        gin.query_parameter(name)
    except ValueError:
        return False
    return True


def _read_nll(vdir):
    store = ts.open({"driver": "zarr", "kvstore": {
        "driver": "file", "path": os.path.join(vdir, "eval.zarr", "nll_by_position")}}).result()
    return np.asarray(store.read().result())


def write_results(workdir: str, results: dict):
    """``results.json``, ``results.md`` and the two PNG figures from per-variant eval results."""
    table = {v: r["loss"] for v, r in results.items()}
    unit = next(iter(results.values())).get("unit", "byte")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(table, f, indent=1)
    lengths = sorted({int(length) for r in table.values() for length in r})
    lines = ["| variant | " + " | ".join(f"L={length}" for length in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for v, row in table.items():
        cells = [f"{row[str(length)]:.3f}" if str(length) in row else "—" for length in lengths]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"Validation loss (nats/{unit}) by eval length.\n\n" + "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, row in table.items():
        xs = sorted(int(length) for length in row)
        ax.plot(xs, [row[str(x)] for x in xs], "o-", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(x) for x in lengths])
    ax.minorticks_off()
    ax.set(xlabel="eval length (tokens)", ylabel=f"validation loss (nats/{unit})",
           title="length generalization")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "length_generalization.png"), dpi=130)
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in table:
        nll = _read_nll(os.path.join(workdir, v))[-1]
        nll = nll[np.isfinite(nll)]
        width = max(len(nll) // 64, 1)
        smooth = np.convolve(nll, np.ones(width) / width, mode="valid")
        ax.plot(np.arange(len(smooth)) + width // 2, smooth, lw=1, label=v)
    ax.set(xlabel="position", ylabel="NLL (moving average)",
           title="per-position NLL at the longest eval length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "per_position.png"), dpi=130)
    plt.close("all")
    return "\n".join(lines)


@gin.configurable
def sweep(*, name: str = "quick", base_gin=(), variants=gin.REQUIRED, workdir: str | None = None,
          extra_bindings=(), cli_bindings=(), cli_files=()) -> dict:
    """Run every variant (skipping finished ones) and write the results; returns them.

    ``cli_files`` (the command line's ``--gin_file``s, e.g. ``configs/mesh/dp8.gin``) apply to
    every variant after its own files; ``extra_bindings`` (from the sweep's gin file) then
    ``cli_bindings`` (the command line's ``--gin.`` flags) after its own bindings. Only
    process 0 writes the results.
    """
    extra_bindings = list(extra_bindings) + list(cli_bindings)
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"sweep.variants must be a non-empty dict, got {variants!r}")
    workdir = workdir or os.path.join("runs", name)
    os.makedirs(workdir, exist_ok=True)
    t0, results = time.perf_counter(), {}
    for i, (vname, variant) in enumerate(variants.items()):
        done = os.path.join(workdir, vname, "eval.json")
        if os.path.exists(done):
            log.info("[%d/%d] %s: finished earlier, skipped", i + 1, len(variants), vname)
            with open(done) as f:
                results[vname] = json.load(f)
            continue
        log.info("[%d/%d] %s (%.0fs elapsed)", i + 1, len(variants), vname,
                 time.perf_counter() - t0)
        results[vname] = run_variant(vname, variant, variants, base_gin, workdir, extra_bindings,
                                     cli_files)
    if jax.process_index() != 0:
        return results
    table = write_results(workdir, results)
    log.info("sweep %s done in %.0fs\n%s", name, time.perf_counter() - t0, table)
    with open(os.path.join(workdir, "sweep_seconds.txt"), "w") as f:
        f.write(f"{time.perf_counter() - t0:.1f}\n")
    return results


def main(argv, bindings):
    del argv
    configurables.init_distributed()
    files = list(configurables.GIN_FILES.value)
    if configurables.PRETRAINED.value:
        bindings = configurables.pretrained_bindings(configurables.PRETRAINED.value) + \
            list(bindings)
    configurables.parse(files, bindings)
    try:
        gin.query_parameter("sweep.variants")
    except ValueError:  # no sweep file given (e.g. only a mesh file): the default sweep
        files = [DEFAULT_SWEEP] + files
        configurables.parse(files, bindings)
    sweep(workdir=configurables.WORKDIR.value, cli_bindings=bindings, cli_files=files)


def run():
    configurables.setup_logging()
    argv, bindings = configurables.absl_argv_with_gin()
    app.run(lambda a: main(a, bindings), argv=argv)
