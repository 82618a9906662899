"""The attention backend registry and ``resolve_backend`` (the ``"auto"`` table).

A backend is a module imported on first use (importing lcattn does not import Pallas) that
defines one of:

* ``pass_fn(block_sizes: BlockSizes, interpret) -> pass`` (*streaming*: one online-softmax pass
  for ``lcattn.attention.streaming_attend``, which runs the normalizer's passes and
  LM-Infinite's branches around it): ``xla``, ``pallas_tpu``, ``pallas_gpu``,
  ``pallas_triton``;
* ``attend(q, k, v, spec, inputs) -> out`` (*dense*: the whole attention): ``reference``,
  ``cudnn`` (jax's cuDNN fused attention, for the specs it can express).

Adding a backend is one ``register`` call. ``"auto"`` resolves through ``AUTO``: the first rule
whose platform matches (and whose ``when`` accepts the spec) names the backend, and every rule
cites the measurement behind it.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Backend:
    """A registered backend: ``name``, the ``module`` that implements it, and its kind."""

    name: str
    module: str
    streaming: bool

    def load(self):
        """The implementing module (imported on first use)."""
        return importlib.import_module(self.module)


@dataclasses.dataclass(frozen=True)
class AutoRule:
    """``"auto"`` on ``platform`` (a ``jax.default_backend()`` name, or ``"*"``) means
    ``backend`` for specs ``when(spec)`` accepts; ``measured`` cites the evidence."""

    platform: str
    backend: str
    measured: str
    when: Callable[[object], bool] = lambda spec: True


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry (a name may be registered once)."""
    if backend.name in REGISTRY or backend.name == "auto":
        raise ValueError(f"backend {backend.name!r} is already registered")
    REGISTRY[backend.name] = backend
    return backend


register(Backend("reference", "lcattn.backends.reference", streaming=False))
register(Backend("xla", "lcattn.backends.xla", streaming=True))
register(Backend("pallas_tpu", "lcattn.backends.pallas_tpu", streaming=True))
register(Backend("pallas_gpu", "lcattn.backends.pallas_gpu", streaming=True))
register(Backend("cudnn", "lcattn.backends.cudnn", streaming=False))
register(Backend("pallas_triton", "lcattn.backends.pallas_triton", streaming=True))

AUTO: tuple[AutoRule, ...] = (
    AutoRule("*", "xla",
             "BENCHMARKS.md, 'Attention: xla backend vs dense jax.nn.dot_product_attention' "
             "(CPU: 4-94x faster than the dense call from 4k to 16k, memory linear in T). "
             "Nothing has been timed on a GPU or TPU yet (pallas_tpu only in interpret mode), "
             "so every platform gets xla."),
)


def streaming_names() -> tuple[str, ...]:
    """The registered streaming backends (those ring attention can run)."""
    return tuple(name for name, b in REGISTRY.items() if b.streaming)


def names() -> tuple[str, ...]:
    """Every accepted backend name: ``"auto"`` and the registered ones."""
    return ("auto",) + tuple(REGISTRY)


def check_name(name, owner: str | None = None) -> None:
    """Raise ``ValueError`` (naming ``owner``) unless ``name`` is ``"auto"`` or registered."""
    if name not in names():
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}`backend` must be one of {names()}, got {name!r}")


def resolve_backend(name: str, spec=None, platform: str | None = None) -> Backend:
    """The backend that runs ``spec`` for ``name`` on ``platform`` (default: jax's).

    A registered name is returned as is; ``"auto"`` takes the first matching ``AUTO`` rule.
    """
    check_name(name)
    if name != "auto":
        return REGISTRY[name]
    platform = platform or jax.default_backend()
    for rule in AUTO:
        if rule.platform in ("*", platform) and rule.when(spec):
            return REGISTRY[rule.backend]
    raise ValueError(f"no 'auto' rule covers platform {platform!r} and spec {spec!r}")
