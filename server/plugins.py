"""The plugin interface: the few hooks that LoRA, NSFW, upscale and upload need.

A plugin is a class registered in the `image_server.plugins` entry-point group
(the built-ins in `plugins/` register the same way, see pyproject.toml), and
enabled by name with PLUGINS=lora,nsfw,upload. Hooks, in the order a request
meets them:

  fields          pydantic model of the request fields it adds
  option(req)     validate those fields -> the value the other hooks get (None: not used)
  prep(option)    what the pipeline must have applied for this request; part of the batch key
  prepare(prep)   engine thread, before a batch whose prep differs from the last
  postprocess()   post-processing pool: look at / replace / withhold each image
  deliver()       post-processing pool: send the encoded images somewhere
Hooks may add fields to each response item (`data[i]`).
"""

import logging
from collections.abc import Hashable
from importlib.metadata import entry_points
from typing import Any

from fastapi import APIRouter
from PIL import Image
from pydantic import BaseModel

from server.config import Settings
from server.errors import bad_request

log = logging.getLogger(__name__)

GROUP = "image_server.plugins"


class Plugin:
    name: str = ""
    fields: type[BaseModel] | None = None
    order: int = 50  # postprocess order: lower runs first (NSFW before upscale)
    body_limits: dict[str, int] = {}  # POST paths of its routes that take bodies over MAX_BODY_MB  # noqa: RUF012

    def __init__(self, settings: Settings, engine: Any) -> None:
        self.settings = settings
        self.engine = engine

    def load(self) -> None:
        """After the engine has loaded, before the server is ready (load models here)."""

    def router(self) -> APIRouter | None:
        """Extra HTTP routes (the LoRA management API)."""
        return None

    def option(self, request: BaseModel) -> Any:
        """The validated value of this plugin's fields for one request; None when the request does not use it."""
        return None

    def prep(self, option: Any) -> Hashable:
        return None

    def prepare(self, prep: Hashable) -> None:
        pass

    def postprocess(self, images: list[Image.Image | None], option: Any, items: list[dict]) -> list[Image.Image | None]:
        """Return the images to keep going with; None withholds an image."""
        return images

    def deliver(self, encoded: list[bytes | None], fmt: str, option: Any, items: list[dict]) -> list[bool]:
        """Send the request's encoded images (None: withheld); True where an image needs no b64_json/url."""
        return [False] * len(encoded)


def discover() -> dict[str, type[Plugin]]:
    return {ep.name: ep.load() for ep in entry_points(group=GROUP)}


def field_names(model: type[BaseModel] | None) -> set[str]:
    if model is None:
        return set()
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if isinstance(info.validation_alias, str):
            names.add(info.validation_alias)
        elif info.validation_alias is not None:
            names.update(c for c in info.validation_alias.choices if isinstance(c, str))
    return names


class PluginSet:
    """The enabled plugins, in the order their hooks run."""

    def __init__(self, settings: Settings, engine: Any, available: dict[str, type[Plugin]] | None = None) -> None:
        available = discover() if available is None else available
        unknown = [n for n in settings.plugin_names if n not in available]
        if unknown:
            raise SystemExit(f"PLUGINS names unknown plugins {unknown}; installed: {sorted(available)}")
        enabled = [available[n](settings, engine) for n in settings.plugin_names]
        self.plugins: list[Plugin] = sorted(enabled, key=lambda p: p.order)
        self._disabled_fields = {
            field: name
            for name, cls in available.items()
            if name not in settings.plugin_names
            for field in field_names(cls.fields)
        }

    @property
    def fields(self) -> list[type[BaseModel]]:
        return [p.fields for p in self.plugins if p.fields is not None]

    def load(self) -> None:
        for plugin in self.plugins:
            plugin.load()

    def routers(self) -> list[APIRouter]:
        return [r for p in self.plugins if (r := p.router()) is not None]

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

    def prep(self, options: dict[str, Any]) -> tuple:
        return tuple(p.prep(options[p.name]) for p in self.plugins)

    def prepare(self, prep: tuple) -> None:
        for plugin, value in zip(self.plugins, prep, strict=True):
            plugin.prepare(value)

    def postprocess(self, images: list, options: dict[str, Any], items: list[dict]) -> list:
        for plugin in self.plugins:
            images = plugin.postprocess(images, options[plugin.name], items)
        return images

    def deliver(self, encoded: list[bytes | None], fmt: str, options: dict[str, Any], items: list[dict]) -> list[bool]:
        delivered = [False] * len(encoded)
        for plugin in self.plugins:
            done = plugin.deliver(encoded, fmt, options[plugin.name], items)
            delivered = [a or b for a, b in zip(delivered, done, strict=True)]
        return delivered

    def body_limits(self) -> dict[str, int]:
        return {path: limit for p in self.plugins for path, limit in p.body_limits.items()}
