"""The engine interface: what the server asks of whatever generates the images.

An engine owns one thread, the engine thread: loading, warm-up, LoRA switches and generation all run there,
one at a time, because pipelines are not thread-safe. The server reaches it through `call` alone.

What an engine may ask of the plugins is `EngineHooks` (server/hooks.py, the plugins' contract): a pipeline
provider (Nunchaku's 4-bit FLUX) and a LoRA applier for weights that LoRAs can be merged into or slotted into
before compilation. `server/` names these hooks; `plugins/` implements them; an engine never imports a plugin.
"""

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from server.errors import bad_request
from server.families import GENERIC, Family
from server.hooks import Decode, EngineHooks, EngineView, LoRAApplier, LoRATarget, PipelineContext
from server.lora import LoRAError, LoRASet, describe
from server.spec import GenerationSpec

T = TypeVar("T")


# (index of the spec in the batch, index of the image in its spec, render) -> None. `render` decodes the partial
# image; the receiver calls it on another thread (the preview thread).
PartialImageSink = Callable[[int, int, Callable[[], Image.Image]], None]


@dataclass
class Progress:
    """What a running batch reports and learns: partial images as they form (stream=true), the denoising steps
    done (a video job's `progress`), and that nobody waits for it any more (stop at the next step)."""

    should_stop: Callable[[], bool] = lambda: False
    partial_image: PartialImageSink | None = None
    step: Callable[[int, int], None] | None = None  # (steps done, steps in all), on the engine thread


class NoHooks:
    """No plugin offers anything (tests and benchmarks that drive an engine alone)."""

    def provide_pipeline(self, context: PipelineContext) -> None:
        return None

    def lora_applier(self, target: LoRATarget) -> None:
        return None


# -- the engine ------------------------------------------------------------------------


class Engine(ABC):
    name: str = ""
    info: dict
    can_batch: bool = True  # whether several requests may share one call
    lora_applier: LoRAApplier | None = None
    # The model's family (server/families.py), known once loaded: its defaults, what it accepts, and for a video
    # family (`family.video`) its frame rate, frame counts and sizes.
    family: Family = GENERIC

    def __init__(self) -> None:
        self.info = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="engine")

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def view(self, decode: Decode) -> EngineView:
        """What the plugins see of this engine, once it has loaded, with the server's `decode`."""
        return EngineView(self.name, self.info, self.lora_applier, self.call, decode)

    @abstractmethod
    def load(self, hooks: EngineHooks) -> None:
        """Engine thread: load the model (the server's /health answers meanwhile)."""

    @abstractmethod
    def defaults(self) -> tuple[int, float]:
        """(steps, guidance) for a request that names neither."""

    def warmup(self) -> None:
        """Engine thread: one small generation before the server reports ready."""

    def check(self, spec: GenerationSpec) -> None:
        """Before a request is queued: a 400 naming the field for anything this engine cannot do."""

    @abstractmethod
    def generate(self, specs: list[GenerationSpec], progress: Progress) -> list[list[Image.Image]]:
        """Engine thread: the images of each spec (all specs share one BatchKey); a video spec's are its frames."""

    def run(self, specs: list[GenerationSpec], progress: Progress) -> list[list[Image.Image]]:
        """Engine thread: the batch's LoRA set, then its images."""
        self.apply_loras(specs[0].loras)
        return self.generate(specs, progress)

    def apply_loras(self, loras: LoRASet) -> None:
        if self.lora_applier is None:
            if loras:
                raise bad_request("This engine cannot apply LoRAs.", "loras", "unsupported")
            return
        try:
            self.lora_applier.apply(loras)
        except LoRAError as exc:  # its message names LoRAs and what is wrong with them, never a path
            raise bad_request(
                f"The LoRA set [{describe(loras)}] cannot be applied: {exc}", "loras", "lora_invalid"
            ) from None

    @property
    def applied_loras(self) -> LoRASet | None:
        """The LoRA set in the weights now, as requests name it (None: unknown, a failed set not undone)."""
        return self.lora_applier.applied_set if self.lora_applier is not None else ()

    @property
    def broken(self) -> bool:
        """The model is in an unknown state (a failed LoRA set could not be undone): only a restart helps."""
        return self.lora_applier is not None and self.lora_applier.broken

    @property
    def healthy(self) -> bool:
        """False while the engine cannot serve (a child process restarting, a broken model)."""
        return not self.broken

    @property
    def retry_after(self) -> int:
        """Seconds a client should wait while the engine is not healthy."""
        return 10

    def close(self) -> None:
        """After the drain: stop what the engine started."""
        self._thread.shutdown(wait=False, cancel_futures=True)
