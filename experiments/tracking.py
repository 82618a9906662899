"""Watching runs: TensorBoard event files, an optional Weights & Biases run, profiler traces, MFU.

``metrics.jsonl`` stays the source of truth; :class:`MetricsLog` writes each of its rows to
TensorBoard (``tensorboardX``, no TensorFlow) and, when asked, to wandb, with the same values at
the same step. A resumed run replays the rows it keeps into fresh event files, so TensorBoard
never shows a step twice or out of order. Only process 0 writes them (the callers decide).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Iterable

import jax
import numpy as np

log = logging.getLogger("lcattn.tracking")
# Dense bf16 peak FLOP/s of one chip, by a substring of ``jax.Device.device_kind`` (vendor data
# sheets; first match wins). Devices not listed (CPUs among them) get no MFU.
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("TPU v6 lite", 918e12),
              ("TPU v5 lite", 197e12), ("TPU v4", 275e12))
_EVENTS = "events.out.tfevents.*"


def peak_flops(device: jax.Device | None = None) -> float | None:
    """``PEAK_FLOPS`` of ``device`` (default: the first device); None when unknown."""
    kind = (device or jax.devices()[0]).device_kind
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def speed(tokens: int, steps: int, seconds: float, num_params: int, num_devices: int,
          peak: float | None) -> dict:
    """Throughput of ``steps`` steps of ``tokens`` tokens each that took ``seconds``:
    ``tokens_per_sec``, ``step_seconds`` and, when ``peak`` (one device's peak FLOP/s) is
    known, ``mfu``, the model FLOP utilization over ``num_devices`` devices.

    Model FLOPs are approximated as ``6 * num_params`` per token (forward 2N, backward 4N; the
    attention scores' ``O(T)`` term, rematerialization and HMT's extra segment tokens are left
    out), and the peak is the chip's dense bf16 one, so a float32 run's MFU reads low.
    """
    seconds = max(seconds, 1e-9)
    out = {"tokens_per_sec": tokens * steps / seconds, "step_seconds": seconds / steps}
    if peak:
        out["mfu"] = out["tokens_per_sec"] * 6 * num_params / (peak * num_devices)
    return out


def import_wandb(project: str | None):
    """The ``wandb`` module when ``project`` is set (None otherwise); a clear ``ImportError``
    when it is not installed (it is an optional dependency, imported only here)."""
    if project is None:
        return None
    try:
        import wandb
    except ImportError as err:
        raise ImportError(f"train.wandb_project = {project!r} asks for Weights & Biases "
                          "logging, but wandb is not installed: `pip install wandb` (offline: "
                          "set WANDB_MODE=offline), or leave train.wandb_project unset") from err
    return wandb


def _scalars(row: dict, prefix: str = "") -> dict:
    return {prefix + k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def _run_config(workdir: str) -> dict:
    """A wandb run's config: ``run.json``'s fields and ``config.gin``'s text."""
    out = {}
    if os.path.exists(os.path.join(workdir, "run.json")):
        with open(os.path.join(workdir, "run.json")) as f:
            out.update(json.load(f))
    if os.path.exists(os.path.join(workdir, "config.gin")):
        with open(os.path.join(workdir, "config.gin")) as f:
            out["config.gin"] = f.read()
    return out


def _writer(logdir: str):
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir, flush_secs=30)


class MetricsLog:
    """``metrics.jsonl`` plus its mirrors: TensorBoard scalars ``train/<key>`` in
    ``tensorboard_dir`` and, with ``wandb``, a wandb run in ``workdir/wandb``.

    Opening it for a run that resumes from step ``start`` truncates ``metrics.jsonl`` to the
    rows with ``step <= start``, deletes the event files directly in ``tensorboard_dir`` (not
    its subfolders, e.g. an evaluation's) and writes the kept rows again into a new one; a new
    wandb run (named after the workdir) gets them too, so the newest run holds the whole
    history. Each row is flushed when written, so a run that stops with an error keeps it.
    """

    def __init__(self, workdir: str, start: int, tensorboard_dir: str, wandb=None,
                 wandb_project: str | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        rows = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            rows = [row for row in rows if row["step"] <= start]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.makedirs(tensorboard_dir, exist_ok=True)
        for path in glob.glob(os.path.join(tensorboard_dir, _EVENTS)):
            os.remove(path)
        self.writer = _writer(tensorboard_dir)
        self.run = None
        if wandb is not None:
            self.run = wandb.init(project=wandb_project, dir=workdir, config=_run_config(workdir),
                                  name=os.path.basename(os.path.abspath(workdir)))
        for row in rows:
            self._mirror(row)
        self.writer.flush()
        log.info("TensorBoard: %s (%d rows replayed)%s", tensorboard_dir, len(rows),
                 f"; wandb run {self.run.dir}" if self.run is not None else "")

    def _mirror(self, row: dict):
        values = _scalars(row, "train/")
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, row["step"])
        if self.run is not None:
            self.run.log(values, step=row["step"])

    def write(self, row: dict):
        """Append ``row`` (with its ``step``) to ``metrics.jsonl`` and mirror it."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._mirror(row)
        self.writer.flush()

    def close(self):
        self.writer.close()
        if self.run is not None:
            self.run.finish()


def write_eval(logdir: str, result: dict, figures: Iterable[str]) -> None:
    """An evaluation's results as TensorBoard events in ``logdir`` (emptied first, so
    re-running an evaluation leaves one copy), at the training step it evaluated
    (``result["step"]``; 0 for a pretrained model): ``loss/L_<length>`` per eval length
    (TensorBoard tags allow no ``=``), ``passkey/L_<length>`` (accuracy, mean over depths) when
    a passkey grid ran, and the PNG ``figures`` that exist as images tagged by file stem."""
    step = result["step"] or 0
    shutil.rmtree(logdir, ignore_errors=True)
    writer = _writer(logdir)
    for length, loss in result["loss"].items():
        writer.add_scalar(f"loss/L_{length}", loss, step)
    if result.get("passkey"):
        for length, row in zip(result["passkey"]["lengths"], result["passkey"]["accuracy"]):
            writer.add_scalar(f"passkey/L_{length}", float(np.mean(row)), step)
    from PIL import Image

    for path in figures:
        if os.path.exists(path):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            writer.add_image(os.path.splitext(os.path.basename(path))[0], pixels, step,
                             dataformats="HWC")
    writer.close()


class Profiler:
    """A ``jax.profiler`` trace of training steps ``START..END`` (inclusive) into ``logdir``
    (``logdir/plugins/profile/<time>/``: an XPlane file for TensorBoard's profile plugin and a
    ``perfetto_trace.json.gz`` for ui.perfetto.dev). ``steps=None`` (the default) costs
    nothing: no trace, no extra synchronization. Every process traces its own devices (files
    named by host). Use as a context manager, so a run that stops early ends its trace."""

    def __init__(self, steps, logdir: str, owner: str = "train.profile_steps"):
        if steps is not None:
            ok = (isinstance(steps, (tuple, list)) and len(steps) == 2
                  and all(isinstance(s, int) and not isinstance(s, bool) for s in steps))
            if not ok or not 1 <= steps[0] <= steps[1]:
                raise ValueError(f"{owner} must be None or (START, END) with "
                                 f"1 <= START <= END, got {steps!r}")
        self.steps, self.logdir, self.active = steps, logdir, False

    def before(self, step: int):
        """Start the trace when ``step`` is the first profiled step this run takes."""
        if self.steps is not None and not self.active and self.steps[0] <= step <= self.steps[1]:
            log.info("profiling steps %d..%d into %s", step, self.steps[1], self.logdir)
            jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs):
        """After step ``END``: wait for ``outputs`` (the step's results), stop the trace."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self):
        if self.active:
            self.active = False
            jax.profiler.stop_trace()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
