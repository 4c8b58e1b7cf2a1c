"""The contract between the server and its plugins: what a plugin sees of the engine, and nothing else of it.

A plugin (server/plugins.py, `Plugin`) imports from server/ only the modules `PLUGIN_API` names (a test
enforces it): this one, the plugin base class, and the libraries a plugin may use (settings, errors, LoRA
files, keys, bodies, images). Here:

  EngineHooks     what an engine asks the plugins while it loads, on the engine thread: a pipeline built
                  instead of its own (`provide_pipeline`: a `ProvidedPipeline`, or `EnginePath`, its own path
                  with other fast options) and how LoRA sets get into the weights (`lora_applier`, for a
                  `LoRATarget`)
  GPU             the GPU the engine runs on, as `PipelineContext` describes it
  LoRAApplier     the interface of every way to apply LoRA sets (merged, a hot-swapped slot, Nunchaku's,
                  SGLang's); the base class keeps the bookkeeping and the all-or-nothing rule
  EngineView      what a plugin sees of the loaded engine (`Plugin.load`): its name, its description, its LoRA
                  applier, and `call`, which runs a function on the engine thread
"""

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from server.config import Settings
from server.families import GENERIC, Family
from server.lora import LoRASet, SetKey, Shapes, describe, set_key

log = logging.getLogger(__name__)

# The modules of server/ a plugin may import (tests/unit/test_architecture.py holds plugins/ to it).
PLUGIN_API = (
    "server.hooks",
    "server.plugins",
    "server.config",
    "server.errors",
    "server.lora",
    "server.auth",
    "server.bodies",
    "server.images",
)

FP8_MIN_CAPABILITY = (8, 9)  # torchao's FP8 dynamic quantization: Ada, Hopper, Blackwell


@dataclass(frozen=True)
class GPU:
    name: str
    capability: tuple[int, int]

    @property
    def sm(self) -> int:
        return self.capability[0] * 10 + self.capability[1]

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]})"


# -- applying LoRA sets ---------------------------------------------------------------


class Applied(NamedTuple):
    """The set in the weights: as requests name it, and its key (each file's stamp: a replaced file is another set)."""

    loras: LoRASet
    key: SetKey


BASE_MODEL = Applied((), ())


class LoRAApplier(ABC):
    """How one engine applies LoRA sets.

    check(path)   any thread but the engine's: read and check the file (LoRAError: why it cannot apply to
                  this model), kept while its stamp holds; a request's files are checked before it queues
    apply(loras)  the engine thread: make `loras` the applied set, all or nothing, from what `check` read
                  (it reads no file; a file replaced since is a LoRAError)
    forget(path)  the file was deleted or replaced: drop what was kept of it
    install()     the engine thread, before the model is compiled (the hot-swapped slot reserves its tensors)

    A subclass writes `_apply` (the set, checked before any weight changes where it can be) and `_reset`
    (back to the exact base model); the bookkeeping and the all-or-nothing rule live here."""

    how = "applied"  # for the log line

    def __init__(self) -> None:
        self._applied: Applied | None = BASE_MODEL  # None: unknown (a reset failed)
        self.broken = False  # a failed set could not be undone: the model must not serve

    @abstractmethod
    def check(self, path: Path) -> None: ...

    def forget(self, path: Path) -> None:
        """Nothing cached by default."""

    def install(self) -> None:
        """Nothing to reserve by default."""

    def describe(self) -> str:
        """How sets are applied, for /v1/models."""
        return self.how

    @abstractmethod
    def _apply(self, loras: LoRASet) -> None: ...

    @abstractmethod
    def _reset(self) -> None: ...

    @property
    def applied(self) -> SetKey | None:
        """The applied set's key; None when unknown."""
        return self._applied.key if self._applied is not None else None

    @property
    def applied_set(self) -> LoRASet | None:
        """The applied set, as requests name it (the scheduler prefers its requests); None when unknown."""
        return self._applied.loras if self._applied is not None else None

    def apply(self, loras: LoRASet) -> None:
        key = set_key(loras)
        if key == self.applied:
            return
        started = time.monotonic()
        try:
            self._apply(loras)
        except BaseException:
            self._undo()
            raise
        self._applied = Applied(loras, key)
        log.info("LoRA set [%s] %s in %.3fs", describe(loras), self.how, time.monotonic() - started)

    def _undo(self) -> None:
        self._applied = None
        try:
            self._reset()
        except Exception:
            self.broken = True
            log.exception("a failed LoRA set could not be undone: the engine stops serving")
            return
        self._applied = BASE_MODEL


# -- what an engine asks the plugins while it loads -----------------------------------


@dataclass(frozen=True)
class PipelineContext:
    """What a pipeline provider gets: the model folder and its family, where it runs, and the engine's own
    loader."""

    path: Path
    device: torch.device
    gpu: GPU | None
    settings: Settings
    load_pipeline: Callable[..., Any]  # (path, dtype, **components) -> pipeline
    family: Family = GENERIC


@dataclass
class ProvidedPipeline:
    """A pipeline built by a plugin (Nunchaku), with how to place it and what to finish once adopted."""

    pipe: Any
    dtype: torch.dtype
    offload: str = ""  # "", "model" or "sequential" (diffusers' CPU offload)
    info: dict = field(default_factory=dict)
    lora_applier: LoRAApplier | None = None
    finish: Callable[[dict[str, Any]], None] = lambda pipelines: None  # every mode's pipeline, once built


@dataclass(frozen=True)
class EnginePath:
    """The provider cannot run here: the engine serves its own path with these fast options (logged, shown)."""

    fp8: bool
    compile: bool
    reason: str


@dataclass(frozen=True)
class LoRATarget:
    """Where LoRA sets must go: merged into `pipe`'s weights, or (not mergeable: FP8 or compiled weights)
    into a slot reserved before compilation. `shapes` are the layers as LoRA files name them."""

    pipe: Any
    mergeable: bool
    shapes: Shapes
    dtype: torch.dtype


class EngineHooks(Protocol):
    def provide_pipeline(self, context: PipelineContext) -> ProvidedPipeline | EnginePath | None: ...

    def lora_applier(self, target: LoRATarget) -> LoRAApplier | None: ...


# -- what a plugin sees of the loaded engine -------------------------------------------


# Runs a job of server/bodies.py (a form to parse, say) in a decode process by a deadline (time.monotonic()),
# naming what it reads and its field in the 400 it may answer (server/decoders.py, `DecoderPool.run`).
Decode = Callable[[Any, float, str, str | None], Awaitable[Any]]


@dataclass(frozen=True)
class EngineView:
    """The loaded engine, as a plugin sees it (`Plugin.load`, which itself runs on the engine thread), and the
    server's decode processes for what its routes parse."""

    name: str  # the model's id in /v1/models
    info: dict  # how it runs (/v1/models' `engine`)
    lora_applier: LoRAApplier | None  # None: this engine cannot apply LoRAs
    call: Callable[[Callable[[], Any]], Awaitable[Any]]  # from the event loop: run a function on the engine thread
    decode: Decode  # from the event loop: the server's decode processes
