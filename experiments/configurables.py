"""gin registrations for lcattn objects and option groups, and the gin/absl command line.

lcattn's classes and the option groups (frozen dataclasses) are registered as they are
(``gin.register`` does not wrap them), under short module names used by the configs::

    masks.Lambda.window = 128          attention/lcattn.AttentionSpec.mask = @masks.Lambda()
    normalizers.Reweighted.p = 15      positions.RoPE.theta = 10000
    build_model.memory = @memory.HMTConfig()     memory.HMTConfig.segment_len = 128
    build_model.mamba2 = @layers.Mamba2Config()  layers.Mamba2Config.state_dim = 64
    layers.Mamba2Config.options = @ssm.SSMOptions()      ssm.SSMOptions.window = 128
    train.data = @data.DataConfig()    data.DataConfig.packing = "chunk"
    evaluate.passkey = @tasks.Passkey()          tasks.Passkey.trials = 0
    train.mesh = @sharding.make_mesh()  sharding.make_mesh.fsdp = 8   (configs/mesh/*.gin)
    sharding.logical_rules.overrides = {"mlp": None}     (lcattn.sharding.DEFAULT_RULES)

A group's bindings apply only where a parameter is bound to it (``@data.DataConfig()``);
``configs/base.gin`` binds ``train.data``, ``evaluate.data`` and ``evaluate.passkey``.
Bindings renamed when the groups were introduced are rewritten in a run's old ``config.gin``
and named with their new place everywhere else (``experiments.legacy``).

Command lines take ``--gin_file`` (repeatable, later files override earlier ones) and
``--gin.NAME=VALUE``, rewritten to the binding ``NAME = VALUE``. Unknown names, missing files and
bad values stop with a message naming them.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Sequence

import gin
import jax
from absl import flags
from absl import logging as absl_logging
from jax.sharding import Mesh

from experiments import data, legacy, tasks
from lcattn import attention, layers, masks, memory, normalizers, positions, sharding, ssm
from lcattn.backends import ring_plan
from lcattn.checks import choice

_REGISTERED = False
# Command-line flags shared by experiments.train / evaluate / sweep (absl flags are global).
GIN_FILES = flags.DEFINE_multi_string(
    "gin_file", [], "gin config files, applied in order (later ones override).")
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (one process per host of a "
    "TPU pod slice or a multi-node GPU job; see README 'Sharded runs').")
PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "A Hugging Face-format model folder (config.json, *.safetensors, "
    "tokenizer.json) to evaluate instead of a trained run (experiments.evaluate, "
    "experiments.sweep; lcattn.pretrained).")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The mesh and the logical-axis rules, configurable as `sharding.make_mesh.*` and
# `sharding.logical_rules.overrides` (lcattn.sharding stays free of gin).
make_mesh = gin.external_configurable(sharding.make_mesh, module="sharding")
axis_rules = gin.external_configurable(sharding.logical_rules, module="sharding")


def check_mesh(owner: str, mesh) -> Mesh:
    """``mesh`` (from gin), or the one-device mesh for None; a clear error for anything else."""
    if mesh is None:
        return sharding.single_device_mesh()
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != sharding.MESH_AXES:
        raise ValueError(f"{owner}: `mesh` must be None (one device) or a mesh from "
                         f"lcattn.sharding.make_mesh (@sharding.make_mesh(), "
                         f"configs/mesh/*.gin), got {mesh!r}")
    return mesh


CONTEXT_LAYOUTS = ("auto",) + ring_plan.LAYOUTS


def context_layout(owner: str, requested: str, model, mesh: Mesh,
                   attention_override=None) -> str:
    """The ring layout a run uses (``train.context_layout`` / ``evaluate.context_layout``):
    ``"auto"`` asks the model (``DecoderLM.context_layout``: zigzag for Causal / Full masks,
    contiguous for windows and sinks); ``"contiguous"`` whenever the mesh does not split the
    sequence (``context = 1``) or the model has no attention ring (HMT)."""
    choice(owner, "context_layout", requested, CONTEXT_LAYOUTS)
    n = dict(mesh.shape)["context"]
    if n == 1 or not hasattr(model, "context_layout"):
        return "contiguous"
    layout = model.context_layout(attention_override) if requested == "auto" else requested
    logging.getLogger("lcattn.config").info("%s: sequence split over %d devices (context), "
                                            "%s layout", owner, n, layout)
    return layout


def pretrained_bindings(path: str) -> list[str]:
    """The gin bindings ``--pretrained=PATH`` stands for, placed before the command line's own
    (which may override them): evaluate that folder, ``SEQ_LEN`` = its
    ``max_position_embeddings`` (so window sizes in configs/attention/*.gin follow the model),
    and ``ssm.SSMOptions.*`` bindings applied to its Mamba-2 layers."""
    from lcattn import pretrained

    out = [f"evaluate.pretrained = {path!r}", "evaluate.ssm_options = @ssm.SSMOptions()",
           "evaluate.data = @data.DataConfig()", "evaluate.passkey = @tasks.Passkey()"]
    max_len = pretrained.max_positions(path)
    return out + ([f"SEQ_LEN = {int(max_len)}"] if max_len else [])


def init_distributed() -> None:
    """``jax.distributed.initialize()`` under ``--multihost`` (before anything touches jax's
    devices); a no-op otherwise."""
    if MULTIHOST.value:
        jax.distributed.initialize()
        logging.getLogger("lcattn.config").info(
            "process %d of %d, %d local / %d global devices", jax.process_index(),
            jax.process_count(), jax.local_device_count(), jax.device_count())


def register_all() -> None:
    """Register masks, normalizers, positions, ``AttentionSpec`` and the option groups
    (``HMTConfig``, ``Mamba2Config``, ``SSMOptions``, ``DataConfig``, ``Passkey``) with gin
    (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for cls in (masks.Full, masks.Causal, masks.Local, masks.Sinks, masks.Chunked, masks.Lambda,
                masks.Beyond):
        gin.register(cls, module="masks")
    for cls in (normalizers.Softmax, normalizers.Softplus, normalizers.Reweighted):
        gin.register(cls, module="normalizers")
    for cls in (positions.RoPE, positions.ALiBi, positions.NoPE, positions.Linear,
                positions.NTK, positions.DynamicNTK, positions.YaRN, positions.Llama3):
        gin.register(cls, module="positions")
    gin.register(attention.AttentionSpec, module="lcattn")
    for cls, module in ((memory.HMTConfig, "memory"), (layers.Mamba2Config, "layers"),
                        (ssm.SSMOptions, "ssm"), (data.DataConfig, "data"),
                        (tasks.Passkey, "tasks")):
        gin.register(cls, module=module)
    _REGISTERED = True


def setup_logging() -> None:
    """Progress lines from ``lcattn.*`` loggers on stderr; library (orbax, absl) chatter off."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("lcattn")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def resolve_gin_file(path: str) -> str:
    """A gin file path as given, or relative to the repository root."""
    for candidate in (path, os.path.join(REPO_ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"--gin_file: no such file: {path!r}")


def bindings_from_argv(argv: Sequence[str]) -> list[str]:
    """``--gin.NAME=VALUE`` arguments -> ``["NAME = VALUE"]``; other arguments are left alone."""
    out = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            out.append(f"{name} = {value}")
    return out


def strip_gin_bindings(argv: Sequence[str]) -> list[str]:
    """argv without ``--gin.X=V`` entries (absl would reject them as unknown flags)."""
    return [a for a in argv if not (a.startswith("--gin.") and "=" in a)]


# A run's config.gin is training's operative config, which binds no evaluation parameter:
# evaluating a run reads its corpus and the default passkey grid through the groups, so
# `data.DataConfig.*` and `tasks.Passkey.*` bindings given with it take effect.
RUN_DEFAULTS = "\nevaluate.data = @data.DataConfig()\nevaluate.passkey = @tasks.Passkey()\n"


def parse(gin_files: Sequence[str], bindings: Sequence[str], *, finalize: bool = True,
          run_config: str | None = None) -> None:
    """Clear gin, then parse ``run_config``, ``gin_files`` in order and ``bindings`` last.

    ``run_config``: a run's saved ``config.gin``; one written before the option groups has its
    moved bindings rewritten (``experiments.legacy.migrate``, logged). Raises ``ValueError``
    naming the file or binding that failed (unknown configurable or parameter, bad syntax or
    value; a binding that moved says where to) and ``FileNotFoundError`` for a missing file.
    """
    register_all()
    for module in ("train", "evaluate", "sweep"):  # register their configurables
        importlib.import_module(f"experiments.{module}")
    gin.clear_config()
    gin.add_config_file_search_path(REPO_ROOT)
    files = [resolve_gin_file(f) for f in gin_files]
    legacy.check_moved(files, bindings)
    try:
        if run_config is not None:
            with open(run_config) as f:
                text, moved = legacy.migrate(f.read())
            if moved:
                logging.getLogger("lcattn.config").warning(
                    "%s predates the option groups; read with %s", run_config, "; ".join(moved))
            gin.parse_config(text + RUN_DEFAULTS)
        gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=finalize,
                                            skip_unknown=False)
    except (ValueError, KeyError, SyntaxError, TypeError) as err:
        sources = ([run_config] if run_config else []) + list(gin_files)
        raise ValueError(f"invalid gin configuration ({', '.join(sources) or 'no files'}; "
                         f"bindings {list(bindings)}): {err}") from err


def absl_argv_with_gin(argv: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(argv for absl, gin bindings)`` from ``sys.argv``."""
    argv = list(sys.argv if argv is None else argv)
    return strip_gin_bindings(argv), bindings_from_argv(argv)
