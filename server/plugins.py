"""The plugin interface: the hooks that LoRA, NSFW, upscale, upload and the Nunchaku backend need.

A plugin is a class registered in the `image_server.plugins` entry-point group (the built-ins in `plugins/`
register the same way, see pyproject.toml), enabled by name with PLUGINS=lora,nsfw,upload. It declares its
request fields (`fields`, a pydantic model); its settings (a dataclass of `server.config.option`s: flags and
variables like the server's own) are registered under the same name in the `image_server.settings` group, from a
light module (`server.config.plugin_sections`), and reach it as `self.config`. Hooks, in the order they run:

  engine, while it loads (engine thread)
    provide_pipeline(context)   build the pipeline instead of the engine (Nunchaku), or name a fallback
    lora_applier(target)        how LoRA sets get into this pipeline's weights (merged, or a slot)
  load()                        after the engine has loaded, before the server is ready
  per request
    option(request)             validate its fields -> the value the other hooks get (None: not used)
    loras(option)               the LoRA set the request needs applied (part of its batch key)
    output_size(option, size)   the size of the images it will hand on (upscale)
    postprocess(images, ...)    post-processing pool: look at / replace / withhold each image
    deliver(encoded, ...)       event loop, async: send the encoded images somewhere before the deadline
Hooks may add fields to each response item (`data[i]`).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from fastapi import APIRouter
from PIL import Image
from pydantic import BaseModel

from server.config import Settings
from server.engines.base import Engine, Fallback, LoRATarget, PipelineContext, ProvidedPipeline
from server.errors import bad_request
from server.lora import LoRAApplier, LoRASet
from server.protocol import field_keys

log = logging.getLogger(__name__)

GROUP = "image_server.plugins"


@dataclass(frozen=True)
class RouteLimit:
    """A route of a plugin that takes bodies over MAX_BODY_MB, and the 413's message past its limit."""

    bytes: int
    message: str


class Plugin:
    name: ClassVar[str] = ""
    fields: ClassVar[type[BaseModel] | None] = None
    order: ClassVar[int] = 50  # postprocess order: lower runs first (NSFW before upscale)

    @classmethod
    def enabled(cls, settings: Settings) -> bool:
        """Named in PLUGINS; a backend may also turn itself on from its own settings."""
        return cls.name in settings.plugin_names

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.config = settings.sections.get(self.name)
        self.engine = engine

    # -- engine hooks ---------------------------------------------------

    def provide_pipeline(self, context: PipelineContext) -> ProvidedPipeline | Fallback | None:
        return None

    def lora_applier(self, target: LoRATarget) -> LoRAApplier | None:
        return None

    # -- lifecycle ------------------------------------------------------

    def load(self) -> None:
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

    def option(self, request: BaseModel) -> Any:
        """The validated value of this plugin's fields for one request; None when the request does not use it.
        Runs in a worker thread: it may look at files or resolve host names."""
        return None

    def loras(self, option: Any) -> LoRASet:
        return ()

    def output_size(self, option: Any, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def postprocess(self, images: list[Image.Image | None], option: Any, items: list[dict]) -> list[Image.Image | None]:
        """Return the images to keep going with; None withholds an image."""
        return images

    async def deliver(
        self, encoded: list[bytes | None], fmt: str, option: Any, items: list[dict], deadline: float
    ) -> list[bool]:
        """Send the encoded images (None: withheld) by `deadline` (monotonic); True where an image needs no
        b64_json/url. An image not delivered in time is returned in the response instead."""
        return [False] * len(encoded)


def _postprocess(plugin: Plugin, option: Any, items: list[dict], images: list) -> list:
    return plugin.postprocess(images, option, items)


def discover() -> dict[str, type[Plugin]]:
    return {ep.name: ep.load() for ep in entry_points(group=GROUP)}


class PluginSet:
    """The enabled plugins, in the order their hooks run. It is the engine's `EngineHooks`."""

    def __init__(self, settings: Settings, engine: Engine, available: dict[str, type[Plugin]] | None = None) -> None:
        available = discover() if available is None else available
        unknown = [n for n in settings.plugin_names if n not in available]
        if unknown:
            raise SystemExit(f"PLUGINS names unknown plugins {unknown}; installed: {sorted(available)}")
        enabled = [cls(settings, engine) for cls in available.values() if cls.enabled(settings)]
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

    def provide_pipeline(self, context: PipelineContext) -> ProvidedPipeline | Fallback | None:
        return next((found for p in self.plugins if (found := p.provide_pipeline(context)) is not None), None)

    def lora_applier(self, target: LoRATarget) -> LoRAApplier | None:
        return next((found for p in self.plugins if (found := p.lora_applier(target)) is not None), None)

    # -- lifecycle ------------------------------------------------------

    def load(self) -> None:
        for plugin in self.plugins:
            plugin.load()

    def routers(self) -> list[APIRouter]:
        return [r for p in self.plugins if (r := p.router()) is not None]

    def route_limits(self) -> dict[str, RouteLimit]:
        return {path: limit for p in self.plugins for path, limit in p.route_limits().items()}

    # -- requests -------------------------------------------------------

    def options(self, request: BaseModel) -> dict[str, Any]:
        for field in request.model_extra or {}:
            plugin = self._disabled_fields.get(field)
            if plugin:
                raise bad_request(
                    f"'{field}' needs the '{plugin}' plugin, which is not enabled on this server (PLUGINS).",
                    field,
                    "plugin_disabled",
                )
        return {p.name: p.option(request) for p in self.plugins}

    def loras(self, options: dict[str, Any]) -> LoRASet:
        return next((found for p in self.plugins if (found := p.loras(options[p.name]))), ())

    def output_size(self, options: dict[str, Any], size: tuple[int, int]) -> tuple[int, int]:
        for plugin in self.plugins:
            size = plugin.output_size(options[plugin.name], size)
        return size

    def postprocess_steps(self, options: dict[str, Any], items: list[dict]) -> list[Callable[[list], list]]:
        """Each plugin's postprocess as a step, so that a request that is gone can stop between them."""
        return [partial(_postprocess, p, options[p.name], items) for p in self.plugins]

    async def deliver(
        self, encoded: list[bytes | None], fmt: str, options: dict[str, Any], items: list[dict], deadline: float
    ) -> list[bool]:
        delivered = [False] * len(encoded)
        for plugin in self.plugins:
            done = await plugin.deliver(encoded, fmt, options[plugin.name], items, deadline)
            delivered = [a or b for a, b in zip(delivered, done, strict=True)]
        return delivered
