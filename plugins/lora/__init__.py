"""LoRA plugin: up to MAX_LORAS weighted LoRAs per request, by name from LORA_DIR, and their management API.

A request's LoRA set is part of its batch key and is applied on the engine thread before its batch runs.
How a set gets into the weights is the engine's business, asked through the `lora_applier` hook: merged
into the weights (`merge.LoRAMerger`), or, where the weights cannot be merged into (FP8, compiled), a
hot-swapped slot reserved before compilation (`hotswap.HotswapLoRA`). Engines with a way of their own
(Nunchaku, SGLang) bring their own applier. Every file is checked against the model before it is accepted,
by the management API, for LORA_DEFAULTS and for each request before it queues, off the engine thread.

Names: letters, digits and `. _ -`, starting with a letter or digit, not ending in `.`; unique ignoring case
(an upload whose name differs from an existing one only by case is a 409), so that `Style`, `STYLE` and
`style.` can never name three files. A `.safetensors` suffix, in any case, is not part of the name.
"""

import asyncio
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from plugins.lora.demo import write_demo_loras
from plugins.lora.hotswap import HotswapLoRA
from plugins.lora.merge import LoRAMerger
from server.auth import check_key, key_matches, presented_key, require_api_key
from server.bodies import FormLimits, FormPart, form_file_job, spool
from server.config import MOST_LORAS
from server.errors import APIError, bad_request, unavailable
from server.hooks import Decode, EngineView, LoRAApplier, LoRATarget
from server.lora import MAX_WEIGHT, LoRAError, LoRASet
from server.plugins import Plugin, RouteLimit

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUFFIX = ".safetensors"
NAME_RULE = "letters, digits and . _ -, starting with a letter or digit, not ending in '.'"


class LoRARef(BaseModel):
    name: str = Field(min_length=1, max_length=160)
    weight: float = Field(default=1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)


class LoRAFields(BaseModel):
    loras: list[LoRARef] | None = Field(default=None, max_length=MOST_LORAS)


def valid_name(name: str) -> bool:
    return (
        _NAME.fullmatch(name) is not None
        and ".." not in name
        and not name.endswith(".")
        and not name.casefold().endswith(SUFFIX)
    )


def without_suffix(name: str) -> str:
    """'x.safetensors' and 'x.SafeTensors' name the LoRA 'x'."""
    return name[: -len(SUFFIX)] if name.casefold().endswith(SUFFIX) else name


def parse_defaults(text: str) -> list[LoRARef]:
    """'style:1.0,detail:0.7' -> LoRARefs (a name without weight means 1.0)."""
    refs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        try:
            refs.append(LoRARef(name=name.strip(), weight=float(weight) if weight else 1.0))
        except ValueError as exc:
            raise SystemExit(f"LORA_DEFAULTS={text!r}: {part!r} is not NAME or NAME:WEIGHT ({exc})") from None
    return refs


class LoRAPlugin(Plugin[None]):
    name = "lora"
    fields = LoRAFields

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.dir = Path(self.config.lora_dir).resolve()
        self.max_bytes = int(self.config.lora_max_mb * 2**20)
        self.defaults: LoRASet = ()
        self.applier: LoRAApplier | None = None
        self.decode: Decode | None = None  # the server's decode processes, once loaded
        self._claimed: set[str] = set()  # names being uploaded right now

    # -- engine hooks ----------------------------------------------------

    def lora_applier(self, target: LoRATarget) -> LoRAApplier:
        if target.mergeable:
            return LoRAMerger(target.pipe, target.shapes, target.dtype)
        return HotswapLoRA(target.pipe, self.config.lora_hotswap_rank, target.shapes, target.dtype)

    # -- lifecycle -------------------------------------------------------

    def load(self, engine: EngineView) -> None:
        """Engine thread, after the model loaded: the engine's applier, and the default set checked."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.applier = engine.lora_applier
        self.decode = engine.decode
        if self.applier is None:
            raise SystemExit(f"PLUGINS has lora, but this engine ({engine.info}) cannot apply LoRAs.")
        try:
            self.defaults = self.resolve(parse_defaults(self.config.lora_defaults), "LORA_DEFAULTS")
        except APIError as exc:
            raise SystemExit(f"LORA_DEFAULTS={self.config.lora_defaults!r}: {exc.message}") from None
        log.info("LoRA dir %s, default set %s", self.dir, [(p.stem, w) for p, w in self.defaults] or "none")

    @classmethod
    def demo_assets(cls, folder: Path) -> list[str]:
        names = write_demo_loras(folder)
        return [f"LORA_DIR={folder}", f"# LoRAs for the demo model: {', '.join(names)}"]

    # -- requests --------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.dir / (name + SUFFIX)

    def resolve(self, refs: list[LoRARef], param: str) -> LoRASet:
        """The set the refs name, each file read and checked against the model (in the caller's thread)."""
        if len(refs) > self.config.max_loras:
            raise bad_request(f"At most {self.config.max_loras} LoRAs may be merged per request.", param)
        entries: dict[str, float] = {}
        for i, ref in enumerate(refs):
            where = f"{param}[{i}].name" if param == "loras" else param
            name = without_suffix(ref.name)
            if not valid_name(name):
                raise bad_request(f"{ref.name!r} is not a LoRA name (a file name in LORA_DIR, no path).", where)
            if not self.path(name).is_file():
                raise bad_request(
                    f"There is no LoRA named '{name}'; GET /v1/loras lists them.", where, "lora_not_found"
                )
            if name in entries:
                raise bad_request(f"LoRA '{name}' is named twice.", where)
            if not math.isfinite(ref.weight):
                raise bad_request("LoRA weights must be finite numbers.", where.replace(".name", ".weight"))
            entries[name] = ref.weight
            if ref.weight != 0:
                self.check(name, where)
        return tuple(sorted((self.path(n), w) for n, w in entries.items() if w != 0))

    def check(self, name: str, param: str) -> None:
        """Off the engine thread: the file read and checked now, so that applying it reads nothing."""
        try:
            self.applier.check(self.path(name))
        except LoRAError as exc:
            raise bad_request(f"LoRA '{name}' cannot be applied to this model: {exc}", param, "lora_invalid") from None

    def loras(self, request) -> LoRASet:
        """The plan's worker thread: the request's set, every file checked before the request queues."""
        if request.loras is not None:
            return self.resolve(request.loras, "loras")
        for path, _ in self.defaults:  # a default file replaced on disk is read here, not by the engine
            self.check(path.stem, "loras")
        return self.defaults

    # -- management API --------------------------------------------------

    def catalog(self) -> list[dict]:
        files = sorted(self.dir.glob("*" + SUFFIX)) if self.dir.is_dir() else []
        defaults = {p.stem: w for p, w in self.defaults}
        return [
            {
                "id": f.stem,
                "object": "lora",
                "bytes": f.stat().st_size,
                "created": int(f.stat().st_mtime),
                "default_weight": defaults.get(f.stem),
            }
            for f in files
            if valid_name(f.stem)
        ]

    def check_admin(self, request: Request) -> None:
        settings = self.settings
        if not settings.api_keys and not settings.admin_keys:
            return  # no keys configured anywhere: an open development server
        if not settings.admin_keys:
            raise APIError(403, "LoRA management is disabled: the operator has set no ADMIN_API_KEY.", code="forbidden")
        if key_matches(presented_key(request), settings.api_keys):
            raise APIError(403, "Managing LoRAs needs the admin key (ADMIN_API_KEY).", code="forbidden")
        check_key(request, settings.admin_keys)

    async def upload(self, request: Request) -> dict:
        self.check_admin(request)
        if self.decode is None:  # the routes are up while the model loads; the checks need the loaded engine
            raise unavailable("The model is still loading; retry shortly.", "model_loading", 10)
        parts = await self._read_upload(request)
        try:
            return await self._add(parts)
        finally:
            for part in parts:
                if part.path is not None:
                    part.path.unlink(missing_ok=True)

    async def _read_upload(self, request: Request) -> list[FormPart]:
        """The form spooled to LORA_DIR as it arrives, then parsed in a decode process (a body of a GiB is
        neither held in memory nor parsed on the event loop); the LoRA file is written next to it."""
        fd, name = tempfile.mkstemp(dir=self.dir, prefix=".upload-", suffix=".body")
        os.close(fd)
        body = Path(name)
        limits = FormLimits(1, 4, 4096, self.max_bytes, "file_too_large")
        content_type = request.headers.get("content-type", "")
        try:
            await spool(request.stream(), body)
            job = form_file_job(body, content_type, limits, self.dir)
            return await self.decode(job, request.state.life.deadline, "the LoRA upload", "file")
        finally:
            body.unlink(missing_ok=True)

    async def _add(self, parts: list[FormPart]) -> dict:
        upload = next((p for p in parts if p.name == "file" and p.path is not None), None)
        if upload is None:
            raise bad_request(
                "Send the LoRA as a multipart file field named 'file'.", "file", "missing_required_parameter"
            )
        named = next((p.text for p in parts if p.name == "name" and p.filename is None), "")
        name = without_suffix(named or Path(upload.filename or "").name)
        if not valid_name(name):
            raise bad_request(f"{name[:200]!r} is not a valid LoRA name ({NAME_RULE}).", "name")
        with self._claim(name):
            await self._check_file(upload.path)
            self._publish(upload.path, name)
        log.info("LoRA %s added (%d bytes)", name, self.path(name).stat().st_size)
        return next(item for item in self.catalog() if item["id"] == name)

    @contextmanager
    def _claim(self, name: str) -> Iterator[None]:
        """One upload per name (ignoring case) at a time, and none over an existing one: 409 for the others."""
        key = name.casefold()
        existing = next((f.stem for f in self.dir.glob("*" + SUFFIX) if f.stem.casefold() == key), None)
        if key in self._claimed or existing:
            raise _exists(existing or name)
        self._claimed.add(key)
        try:
            yield
        finally:
            self._claimed.discard(key)

    async def _check_file(self, staged: Path) -> None:
        """In a worker thread: an admin's file is untrusted bytes too, and the engine thread parses none. The
        check runs to its end even when the request is cancelled (its client gone, its deadline passed): the
        file stays until it is done."""

        def check() -> None:
            try:
                self.applier.check(staged)
            finally:
                self.applier.forget(staged)

        job = asyncio.ensure_future(asyncio.to_thread(check))
        try:
            await asyncio.shield(job)
        except LoRAError as exc:
            raise bad_request(f"The file cannot be applied to this model: {exc}", "file", "lora_invalid") from None
        except asyncio.CancelledError:
            await asyncio.wait({job})
            raise

    def _publish(self, staged: Path, name: str) -> None:
        """Atomic: a link fails if the name exists, so two servers sharing LORA_DIR cannot overwrite each other."""
        try:
            os.link(staged, self.path(name))
        except FileExistsError:
            raise _exists(name) from None

    def delete(self, request: Request, name: str) -> dict:
        self.check_admin(request)
        if not valid_name(name) or not self.path(name).is_file():
            raise APIError(404, f"There is no LoRA named '{name}'.", param="name", code="lora_not_found")
        if self.path(name) in {p for p, _ in self.defaults}:
            raise bad_request(f"'{name}' is in the default set (LORA_DEFAULTS); it cannot be deleted.", "name")
        self.path(name).unlink(missing_ok=True)  # deleted by another call meanwhile: deleted all the same
        self.applier.forget(self.path(name))
        log.info("LoRA %s deleted", name)
        return {"id": name, "object": "lora", "deleted": True}

    def route_limits(self) -> dict[str, RouteLimit]:
        message = f"The LoRA file is larger than {self.config.lora_max_mb:g} MiB (LORA_MAX_MB)."
        return {"/v1/loras": RouteLimit(self.max_bytes + 2**20, message)}  # + the multipart envelope

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.get("/v1/loras")
        async def list_loras(request: Request) -> dict:
            await require_api_key(request)
            return {"object": "list", "data": self.catalog(), "max_loras": self.config.max_loras}

        @router.post("/v1/loras")
        async def add_lora(request: Request) -> dict:
            return await self.upload(request)

        @router.delete("/v1/loras/{name}")
        async def delete_lora(request: Request, name: str) -> dict:
            return self.delete(request, name)

        return router


def _exists(name: str) -> APIError:
    return APIError(
        409,
        f"A LoRA named '{name}' exists (names are unique ignoring case); DELETE it first.",
        param="name",
        code="conflict",
    )
