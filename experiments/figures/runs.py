"""The trained-and-evaluated runs the figures read, shared between figures and seeds.

A :class:`Run` is a sweep variant (gin files, bindings, optionally the checkpoint of another
run) without a seed; :class:`Pool` trains and evaluates it once per seed into
``WORKDIR/<run>_s<seed>/`` through ``experiments.sweep.run_variant`` (so a run folder is an
ordinary sweep variant folder: ``eval.json``, ``eval.zarr``, checkpoints) and skips runs whose
``eval.json`` exists. Two figures asking for the same run name get the same folder: the name
must then mean the same configuration, which the pool checks (within a process by the
:class:`Run`, across processes and presets by the ``figure_run.json`` each folder keeps).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import tensorstore as ts

log = logging.getLogger("lcattn.figures")


@dataclasses.dataclass(frozen=True)
class Run:
    """``gin`` files and ``bindings`` on top of the preset's base; ``checkpoint_from``: the
    name of another run (same seed) whose checkpoint this one evaluates without training."""
    name: str
    gin: tuple[str, ...] = ()
    bindings: tuple[str, ...] = ()
    checkpoint_from: Run | None = None


@dataclasses.dataclass(frozen=True)
class Scale:
    """A preset's common ground: base gin files, bindings for every run, and the seeds."""
    base_gin: tuple[str, ...]
    bindings: tuple[str, ...]
    seeds: tuple[int, ...]


class Pool:
    """Runs of one preset under ``workdir``, trained and evaluated on first request."""

    def __init__(self, workdir: str, scale: Scale):
        self.workdir, self.scale = workdir, scale
        self._known: dict[str, Run] = {}
        self._t0 = time.perf_counter()

    def _register(self, run: Run) -> None:
        known = self._known.setdefault(run.name, run)
        if known != run:
            raise ValueError(f"figures: two different runs are both named {run.name!r}: "
                             f"{known} and {run}")
        if run.checkpoint_from is not None:
            self._register(run.checkpoint_from)

    def directory(self, run: Run, seed: int) -> str:
        return os.path.join(self.workdir, f"{run.name}_s{seed}")

    def _variant(self, run: Run, seed: int) -> dict:
        bindings = list(self.scale.bindings) + [f"train.seed = {seed}",
                                                f"build_model.seed = {seed}"]
        return {"gin": list(run.gin), "bindings": bindings + list(run.bindings),
                "checkpoint_from": (None if run.checkpoint_from is None
                                    else f"{run.checkpoint_from.name}_s{seed}")}

    def config(self, run: Run, seed: int) -> dict:
        """What ``figure_run.json`` in the run's folder records: base gin files and variant."""
        return {"base_gin": list(self.scale.base_gin), "variant": self._variant(run, seed)}

    def ensure(self, run: Run, seed: int) -> str:
        """The folder of ``run`` at ``seed``, trained (or its source trained) and evaluated."""
        from experiments.sweep import run_variant  # heavy import, only when training

        self._register(run)
        vdir = self.directory(run, seed)
        config = self.config(run, seed)
        stamp = os.path.join(vdir, "figure_run.json")
        found = None
        if os.path.exists(stamp):
            with open(stamp) as f:
                found = json.load(f)
        elif os.path.isdir(vdir):
            found = "a folder without figure_run.json"
        if found is not None and found != config:
            raise ValueError(
                f"figures: {vdir} holds run {run.name!r} made with another configuration "
                f"({found}; asked for {config}), e.g. by another preset: use another "
                "--workdir (default runs/figures/<preset>) or delete the folder")
        if os.path.exists(os.path.join(vdir, "eval.json")):
            return vdir
        if run.checkpoint_from is not None:
            self.ensure(run.checkpoint_from, seed)
        name = os.path.basename(vdir)
        variants = {name: self._variant(run, seed)}
        if run.checkpoint_from is not None:
            source = self.directory(run.checkpoint_from, seed)
            variants[os.path.basename(source)] = self._variant(run.checkpoint_from, seed)
        log.info("figures: run %s (%.0fs elapsed)", name, time.perf_counter() - self._t0)
        os.makedirs(vdir, exist_ok=True)
        with open(stamp, "w") as f:  # first, so an interrupted run resumes only as itself
            json.dump(config, f, indent=1)
        run_variant(name, variants[name], variants, self.scale.base_gin, self.workdir, ())
        return vdir

    def evaluation(self, run: Run, seed: int) -> dict:
        """``eval.json`` of ``run`` at ``seed`` (running it first if needed)."""
        with open(os.path.join(self.ensure(run, seed), "eval.json")) as f:
            return json.load(f)

    def nll_by_position(self, run: Run, seed: int) -> np.ndarray:
        """``[lengths, max_length]`` per-position NLL (NaN past each length)."""
        path = os.path.join(self.ensure(run, seed), "eval.zarr", "nll_by_position")
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": path}}).result()
        return np.asarray(store.read().result())

    def losses(self, run: Run) -> dict[int, list[float]]:
        """Eval length -> the loss of each seed."""
        out: dict[int, list[float]] = {}
        for seed in self.scale.seeds:
            for length, loss in self.evaluation(run, seed)["loss"].items():
                out.setdefault(int(length), []).append(loss)
        return out
