"""A run's orbax checkpoints: sharded saves, restores onto any mesh, damaged steps skipped.

Each step is an orbax ``Composite`` (``params``, ``opt_state``, ``rng``, ``data``: the
iterator state as JSON) under ``WORKDIR/checkpoints/<step>``; every process takes part in
saving and restoring sharded arrays. Restoring reads into ``ShapeDtypeStruct``s that carry
the *target* shardings (``abstract``), so a run resumes or is evaluated on a different mesh
than it was saved on.

Orbax does not notice every damaged file (flipped bytes in an array chunk restore silently
as wrong values), and one that fails mid-restore floods stderr with tensorstore/asyncio
tracebacks. So ``save`` also records the size and CRC-32 of every file of the step in
``<step>/lcattn_crc32.json``, and ``restore_newest`` checks them before orbax reads anything.
A damaged step (a file changed, missing or truncated; or, for a step saved without checksums,
an orbax read error) is reported in one line naming the step, the path and the file; the
newest intact step is used instead, with a warning. ``train`` then moves the damaged step to
``WORKDIR/checkpoints_damaged/`` (never deleting it) so the run can save that step again;
with no intact step the run stops.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zlib

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("lcattn.checkpoints")
_CONFIG_ERRORS = (KeyError, TypeError)
CHECKSUMS = "lcattn_crc32.json"
_CHUNK = 1 << 24


def directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def manager(workdir: str, keep: int | None = None) -> ocp.CheckpointManager:
    """The ``CheckpointManager`` of ``workdir`` (synchronous saves; ``keep`` newest kept)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory(workdir), options=options)


def abstract(tree, shardings=None):
    """``ShapeDtypeStruct``s of ``tree``'s arrays, with ``shardings`` (a matching tree) or
    each array's own sharding: the restore target that places every array on its mesh."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _files(step_dir: str) -> dict:
    """``relative path -> [size, crc32]`` of every file under ``step_dir`` but the record."""
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel == CHECKSUMS:
                continue
            crc = 0
            with open(path, "rb") as f:
                while block := f.read(_CHUNK):
                    crc = zlib.crc32(block, crc)
            out[rel] = [os.path.getsize(path), crc]
    return out


def save(mgr: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> None:
    """``mgr.save(step, args)``, then the step's file checksums (written by process 0)."""
    mgr.save(step, args=args)
    mgr.wait_until_finished()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lcattn.checkpoints.save")
    if jax.process_index() == 0:
        step_dir = os.path.join(str(mgr.directory), str(step))
        with open(os.path.join(step_dir, CHECKSUMS), "w") as f:
            json.dump(_files(step_dir), f)


def damage(step_dir: str) -> str | None:
    """What is wrong with the files of ``step_dir`` (None: they match their checksums, or the
    step was saved without them)."""
    record = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(record):
        return None
    try:
        with open(record) as f:
            expected = json.load(f)
    except (OSError, ValueError) as err:
        return f"{CHECKSUMS} unreadable ({err})"
    actual = _files(step_dir)
    for rel, (size, crc) in sorted(expected.items()):
        if rel not in actual:
            return f"{rel} is missing"
        if actual[rel][0] != size:
            return f"{rel} has {actual[rel][0]} bytes, {size} were saved"
        if actual[rel][1] != crc:
            return f"{rel} differs from what was saved (CRC-32)"
    return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def restore_newest(mgr: ocp.CheckpointManager, args: ocp.args.Composite):
    """``(step, restored, damaged)``: the newest readable step (None, None when there is no
    step yet) and the unreadable steps (newest first) tried before it.

    Raises ``RuntimeError`` when steps exist but none can be read, and ``ValueError`` when a
    step whose files match their checksums cannot be read into ``args`` (a different model
    configuration: not damage).
    """
    damaged = []
    for step in sorted(mgr.all_steps(), reverse=True):
        path = os.path.join(str(mgr.directory), str(step))
        problem = damage(path)
        if problem:
            log.error("checkpoint step %d at %s is damaged: %s", step, path, problem)
            damaged.append(step)
            continue
        verified = os.path.exists(os.path.join(path, CHECKSUMS))
        try:
            restored = mgr.restore(step, args=args)
        except Exception as err:  # noqa: BLE001 -- orbax/tensorstore raise many types
            if verified or isinstance(err, _CONFIG_ERRORS):  # intact files: not damage
                raise ValueError(f"checkpoint {path} does not match the configured model "
                                 f"({_one_line(err)})") from err
            log.error("checkpoint step %d at %s is unreadable (%s)", step, path, _one_line(err))
            damaged.append(step)
            continue
        if damaged:
            log.warning("using step %d, the newest intact checkpoint, instead of damaged "
                        "step(s) %s", step, damaged)
        return step, restored, damaged
    if damaged:
        raise RuntimeError(f"no readable checkpoint in {mgr.directory}: step(s) {damaged} are "
                           "damaged (left in place); move them away to start over")
    return None, None, []


def set_aside(mgr: ocp.CheckpointManager, workdir: str, steps) -> None:
    """Move damaged ``steps`` to ``WORKDIR/checkpoints_damaged/`` (process 0), so the run can
    save those steps again; the files are kept for inspection."""
    if not steps:
        return
    if jax.process_index() == 0:
        target = os.path.join(os.path.abspath(workdir), "checkpoints_damaged")
        os.makedirs(target, exist_ok=True)
        for step in steps:
            dest = os.path.join(target, str(step))
            suffix = 1
            while os.path.exists(dest):
                dest, suffix = os.path.join(target, f"{step}.{suffix}"), suffix + 1
            shutil.move(os.path.join(str(mgr.directory), str(step)), dest)
            log.warning("damaged checkpoint step %d moved to %s", step, dest)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lcattn.checkpoints.set_aside")
    mgr.reload()
