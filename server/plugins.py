"""The plugin interface: the hooks that LoRA, NSFW, upscale, upload and the Nunchaku backend need.

A plugin is a class registered in the `image_server.plugins` entry-point group (the built-ins in `plugins/`
register the same way, see pyproject.toml), enabled by name with PLUGINS=lora,nsfw,upload. It declares its
request fields (`fields`, a pydantic model); its settings (a dataclass of `server.config.option`s: flags and
variables like the server's own) are registered under the same name in the `image_server.settings` group, from a
light module (`server.config.plugin_sections`), and reach it as `self.config`. Of server/ a plugin imports
only the modules `server.hooks.PLUGIN_API` names; of the engine it sees only `server.hooks`. Hooks, in the
order they run:

  engine, while it loads (engine thread)
    provide_pipeline(context)   build the pipeline instead of the engine (Nunchaku), or name its own path
    lora_applier(target)        how LoRA sets get into this pipeline's weights (merged, or a slot)
  load(engine)                  engine thread, after the engine has loaded, before the server is ready: what
                                the plugin sees of the engine (`EngineView`)
  per request (a worker thread first: the plugins may look at files or resolve host names)
    option(request)             its fields validated -> its option, of its own type, which the later hooks get
    loras(request)              the LoRA set the request needs applied (part of what the engine generates)
    output_size(option, size)   the size of the images it will hand on (upscale)
    postprocess(images, option) post-processing pool: each image looked at, replaced or withheld (`Processed`)
    deliver(encoded, ...)       event loop, async: the encoded images sent somewhere by the deadline (`Delivered`)

The engine sees none of it: the service keeps each request's options (`RequestPlugins`), the engine gets what
to generate (server/spec.py). What a plugin adds to an image's `data[i]` is a pydantic model of its own, handed
back with the image by `postprocess` or `deliver`; its fields are written as they were set (unset ones left out).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import APIRouter
from PIL import Image
from pydantic import BaseModel

from server.config import Settings
from server.errors import bad_request
from server.hooks import EnginePath, EngineView, LoRAApplier, LoRATarget, PipelineContext, ProvidedPipeline
from server.lora import LoRASet
from server.protocol import field_keys

log = logging.getLogger(__name__)

GROUP = "image_server.plugins"


@dataclass(frozen=True)
class RouteLimit:
    """A route of a plugin that takes bodies over MAX_BODY_MB, and the 413's message past its limit."""

    bytes: int
    message: str


Option = TypeVar("Option")  # what a plugin's `option` makes of a request's fields, for its later hooks


@dataclass(frozen=True)
class Processed:
    """One image after a plugin's `postprocess`: the image to go on with (None: withheld), and what the plugin
    adds to its `data[i]` (None: nothing)."""

    image: Image.Image | None
    fields: BaseModel | None = None


@dataclass(frozen=True)
class Delivered:
    """One image after a plugin's `deliver`: whether it was delivered (it needs no b64_json or url), and what the
    plugin adds to its `data[i]` (None: nothing)."""

    done: bool
    fields: BaseModel | None = None


class Plugin(Generic[Option]):
    name: ClassVar[str] = ""
    fields: ClassVar[type[BaseModel] | None] = None
    order: ClassVar[int] = 50  # postprocess order: lower runs first (NSFW before upscale)

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        """Named in PLUGINS; a backend may also turn itself on from its own settings."""
        return cls.name in settings.plugin_names

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = settings.sections.get(self.name)

    # -- engine hooks ---------------------------------------------------

    def provide_pipeline(self, context: PipelineContext) -> ProvidedPipeline | EnginePath | None:
        return None

    def lora_applier(self, target: LoRATarget) -> LoRAApplier | None:
        return None

    # -- lifecycle ------------------------------------------------------

    def load(self, engine: EngineView) -> None:
        """Load models, check files; SystemExit with the reason stops the server."""

    def router(self) -> APIRouter | None:
        """Extra HTTP routes (the LoRA management API)."""
        return None

    def route_limits(self) -> dict[str, RouteLimit]:
        """POST paths of its routes whose bodies may be larger than MAX_BODY_MB."""
        return {}

    @classmethod
    def demo_assets(cls, folder: Path) -> list[str]:
        """`image-server demo-assets`: write files that let a new user try this plugin on the demo model;
        returns the settings that use them (lines like NSFW_MODEL_PATH=...)."""
        return []

    # -- request hooks --------------------------------------------------

    def option(self, request: BaseModel) -> Option | None:
        """What this plugin makes of one request's fields, for its later hooks; None when the request does not
        use it."""
        return None

    def loras(self, request: BaseModel) -> LoRASet:
        """The LoRA set the request needs applied, every file checked (LoRA errors: a 400 naming the field)."""
        return ()

    def output_size(self, option: Option | None, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def postprocess(self, images: list[Image.Image | None], option: Option | None) -> list[Processed]:
        """Each image (None: withheld by a plugin before) as it goes on, with what this plugin adds to it."""
        return [Processed(image) for image in images]

    async def deliver(
        self, encoded: list[bytes | None], fmt: str, option: Option | None, deadline: float
    ) -> list[Delivered]:
        """Send the encoded images (None: withheld) by `deadline` (monotonic). An image not delivered in time
        is returned in the response instead."""
        return [Delivered(False) for _ in encoded]


@dataclass(frozen=True)
class RequestPlugins:
    """The enabled plugins with their options for one request: what the service keeps for its later steps."""

    uses: tuple[tuple[Plugin, Any], ...]

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        for plugin, option in self.uses:
            size = plugin.output_size(option, size)
        return size

    def postprocess_steps(self) -> list[Callable[[list[Image.Image | None]], list[Processed]]]:
        """Each plugin's postprocess as a step, so that a request that is gone can stop between them."""
        return [partial(_postprocess, plugin, option) for plugin, option in self.uses]

    async def deliver(self, encoded: list[bytes | None], fmt: str, deadline: float) -> list[list[Delivered]]:
        """Each plugin's deliveries, in order, one per image."""
        return [await plugin.deliver(encoded, fmt, option, deadline) for plugin, option in self.uses]


def _postprocess(plugin: Plugin, option: Any, images: list[Image.Image | None]) -> list[Processed]:
    return plugin.postprocess(images, option)


def discover() -> dict[str, type[Plugin]]:
    return {ep.name: ep.load() for ep in entry_points(group=GROUP)}


class PluginSet:
    """The enabled plugins, in the order their hooks run. It is the engine's `EngineHooks`."""

    def __init__(self, settings: Settings, available: dict[str, type[Plugin]] | None = None) -> None:
        available = discover() if available is None else available
        unknown = [n for n in settings.plugin_names if n not in available]
        if unknown:
            raise SystemExit(f"PLUGINS names unknown plugins {unknown}; installed: {sorted(available)}")
        enabled = [cls(settings) for cls in available.values() if cls.enabled(settings)]
        self.plugins: list[Plugin] = sorted(enabled, key=lambda p: p.order)
        self._disabled_fields = {
            field: name
            for name, cls in available.items()
            if not cls.enabled(settings)
            for field in (field_keys(cls.fields) if cls.fields is not None else {})
        }

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    @property
    def fields(self) -> list[type[BaseModel]]:
        return [p.fields for p in self.plugins if p.fields is not None]

    # -- EngineHooks ----------------------------------------------------

    def provide_pipeline(self, context: PipelineContext) -> ProvidedPipeline | EnginePath | None:
        return next((found for p in self.plugins if (found := p.provide_pipeline(context)) is not None), None)

    def lora_applier(self, target: LoRATarget) -> LoRAApplier | None:
        return next((found for p in self.plugins if (found := p.lora_applier(target)) is not None), None)

    # -- lifecycle ------------------------------------------------------

    def load(self, engine: EngineView) -> None:
        for plugin in self.plugins:
            plugin.load(engine)

    def routers(self) -> list[APIRouter]:
        return [r for p in self.plugins if (r := p.router()) is not None]

    def route_limits(self) -> dict[str, RouteLimit]:
        return {path: limit for p in self.plugins for path, limit in p.route_limits().items()}

    # -- requests -------------------------------------------------------

    def use(self, request: BaseModel) -> tuple[RequestPlugins, LoRASet]:
        """A worker thread: each plugin's option for the request and the LoRA set it needs (the first plugin's
        that names one), each plugin in turn; a field of a disabled plugin is a 400 naming it."""
        for field in request.model_extra or {}:
            plugin = self._disabled_fields.get(field)
            if plugin:
                raise bad_request(
                    f"'{field}' needs the '{plugin}' plugin, which is not enabled on this server (PLUGINS).",
                    field,
                    "plugin_disabled",
                )
        uses, loras = [], ()
        for plugin in self.plugins:
            uses.append((plugin, plugin.option(request)))
            loras = loras or plugin.loras(request)
        return RequestPlugins(tuple(uses)), loras
