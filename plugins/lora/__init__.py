"""LoRA plugin: up to MAX_LORAS weighted LoRAs per request, by name from LORA_DIR, and their management API.

A request's LoRA set is part of its batch key and is applied on the engine
thread before the batch runs. How a set is applied belongs to the engine:
diffusers pipelines get `LoRAMerger` (merged weights, exact restore); an
engine with its own way (Nunchaku, SGLang) offers a `lora_applier` with the
same three methods: check(path), apply([(path, weight), ...]), forget(path).
"""

import asyncio
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from plugins.lora.merge import LoRAError, LoRAMerger
from server.auth import check_key, key_matches, presented_key, require_api_key
from server.errors import APIError, bad_request
from server.plugins import Plugin

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUFFIX = ".safetensors"

# A LoRA set: ((name, weight), ...) sorted by name, no zero weights. Hashable, so it can be in a batch key.
LoRASet = tuple[tuple[str, float], ...]


class LoRARef(BaseModel):
    name: str = Field(min_length=1, max_length=160)
    weight: float = Field(default=1.0, ge=-10, le=10)


class LoRAFields(BaseModel):
    loras: list[LoRARef] | None = Field(default=None, max_length=16)


def parse_defaults(text: str) -> list[LoRARef]:
    """'style:1.0,detail:0.7' -> LoRARefs (a name without weight means 1.0)."""
    refs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        refs.append(LoRARef(name=name.strip(), weight=float(weight) if weight else 1.0))
    return refs


class LoRAPlugin(Plugin):
    name = "lora"
    fields = LoRAFields

    def __init__(self, settings, engine) -> None:
        super().__init__(settings, engine)
        self.dir = Path(settings.lora_dir).resolve()
        self.max_loras = settings.max_loras
        self.max_bytes = int(settings.lora_max_mb * 2**20)
        self.body_limits = {"/v1/loras": self.max_bytes + 2**20}
        self.defaults: LoRASet = ()
        self.applier = None

    # -- lifecycle -------------------------------------------------------

    def load(self) -> None:
        """Engine thread, after the model loaded: pick the applier, check the default set."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.applier = getattr(self.engine, "lora_applier", None) or LoRAMerger(self.engine.pipe)
        try:
            self.defaults = self.resolve(parse_defaults(self.settings.lora_defaults), "LORA_DEFAULTS")
            for name, _ in self.defaults:
                self.applier.check(self.path(name))
        except (APIError, LoRAError) as exc:
            raise SystemExit(f"LORA_DEFAULTS={self.settings.lora_defaults!r}: {getattr(exc, 'message', exc)}") from None
        log.info("LoRA dir %s, default set %s", self.dir, self.defaults or "none")

    # -- requests --------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.dir / (name + SUFFIX)

    def resolve(self, refs: list[LoRARef], param: str) -> LoRASet:
        if len(refs) > self.max_loras:
            raise bad_request(f"At most {self.max_loras} LoRAs may be merged per request.", param)
        entries: dict[str, float] = {}
        for i, ref in enumerate(refs):
            where = f"{param}[{i}].name" if param == "loras" else param
            name = ref.name.removesuffix(SUFFIX)
            if not _NAME.match(name) or ".." in name:
                raise bad_request(f"'{ref.name}' is not a LoRA name (a file name in LORA_DIR, no path).", where)
            if not self.path(name).is_file():
                raise bad_request(
                    f"There is no LoRA named '{name}'; GET /v1/loras lists them.", where, "lora_not_found"
                )
            if name in entries:
                raise bad_request(f"LoRA '{name}' is named twice.", where)
            if not math.isfinite(ref.weight):
                raise bad_request("LoRA weights must be finite numbers.", where.replace(".name", ".weight"))
            entries[name] = ref.weight
        return tuple(sorted((n, w) for n, w in entries.items() if w != 0))

    def option(self, request) -> LoRASet:
        if request.loras is None:
            return self.defaults
        return self.resolve(request.loras, "loras")

    def prep(self, option: LoRASet) -> LoRASet:
        return option

    def prepare(self, prep: LoRASet) -> None:
        try:
            self.applier.apply([(self.path(name), weight) for name, weight in prep])
        except (LoRAError, FileNotFoundError) as exc:
            raise bad_request(f"The LoRA set {list(prep)} cannot be applied: {exc}", "loras", "lora_invalid") from None

    # -- management API --------------------------------------------------

    def catalog(self) -> list[dict]:
        files = sorted(self.dir.glob("*" + SUFFIX)) if self.dir.is_dir() else []
        defaults = dict(self.defaults)
        return [
            {
                "id": f.stem,
                "object": "lora",
                "bytes": f.stat().st_size,
                "created": int(f.stat().st_mtime),
                "default_weight": defaults.get(f.stem),
            }
            for f in files
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
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_request(
                "Send the LoRA as a multipart file field named 'file'.", "file", "missing_required_parameter"
            )
        name = str(form.get("name") or Path(upload.filename or "").name).removesuffix(SUFFIX)
        if not _NAME.match(name) or ".." in name:
            raise bad_request(f"'{name}' is not a valid LoRA name (letters, digits, . _ -).", "name")
        if upload.size is not None and upload.size > self.max_bytes:
            raise bad_request(f"The LoRA is larger than {self.max_bytes // 2**20} MiB.", "file", "file_too_large")
        target = self.path(name)
        if target.exists():
            raise APIError(409, f"A LoRA named '{name}' exists; DELETE it first.", param="name", code="conflict")
        staged = await asyncio.to_thread(self._stage, upload)
        try:
            await request.app.state.service.scheduler.call(lambda: self.applier.check(staged))
        except LoRAError as exc:
            staged.unlink(missing_ok=True)
            raise bad_request(f"The file cannot be applied to this model: {exc}", "file", "lora_invalid") from None
        except Exception:
            staged.unlink(missing_ok=True)
            raise
        os.replace(staged, target)
        self.applier.forget(staged)
        log.info("LoRA %s added (%d bytes)", name, target.stat().st_size)
        return next(item for item in self.catalog() if item["id"] == name)

    def _stage(self, upload: UploadFile) -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".upload-", suffix=SUFFIX)
        with os.fdopen(fd, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out)
        return Path(tmp)

    def delete(self, request: Request, name: str) -> dict:
        self.check_admin(request)
        if not _NAME.match(name) or ".." in name or not self.path(name).is_file():
            raise APIError(404, f"There is no LoRA named '{name}'.", param="name", code="lora_not_found")
        if name in dict(self.defaults):
            raise bad_request(f"'{name}' is in the default set (LORA_DEFAULTS); it cannot be deleted.", "name")
        self.path(name).unlink()
        self.applier.forget(self.path(name))
        log.info("LoRA %s deleted", name)
        return {"id": name, "object": "lora", "deleted": True}

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.get("/v1/loras")
        async def list_loras(request: Request) -> dict:
            await require_api_key(request)
            return {"object": "list", "data": self.catalog(), "max_loras": self.max_loras}

        @router.post("/v1/loras")
        async def add_lora(request: Request) -> dict:
            return await self.upload(request)

        @router.delete("/v1/loras/{name}")
        async def delete_lora(request: Request, name: str) -> dict:
            return self.delete(request, name)

        return router
