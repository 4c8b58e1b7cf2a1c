"""LoRA sets through SGLang's /v1/set_lora, and a check of each LoRA file before SGLang sees it.

Why a check of our own: SGLang accepts a LoRA whose keys match no layer of the model with a 200 and a log
line, and one whose shapes do not fit leaves the model broken until its weights are unmerged. So every file
is checked first, off the engine thread, with the reader the diffusers engine uses (`server.lora.parse_lora`,
its bounds, and the range check in bf16, SGLang's dtype for DiTs), against the model's
transformer(s) built from their configs on PyTorch's meta device: every module name and weight shape, no
weights loaded, no memory used. Keys are converted by the model's own diffusers pipeline class (kohya, xlabs
and PEFT formats), and only the keys for the transformer(s) count, as SGLang applies LoRAs to its DiT alone.

How a set is applied: each file gets a nickname from its path, size and modification time (a replaced file
is a new adapter); the first use loads it (`lora_path`), later uses re-activate SGLang's cached copy
(`lora_path: null`). Several adapters go in one call in merge mode (SGLang stacks adapters only by merging
them); the empty set unmerges, which gives the base weights back bit for bit, and is how a failed set is
undone.

A workaround for SGLang 0.5.23: in a call with several adapters, a layer that the first adapter does not
cover keeps the adapters it held before, and the new ones are added to them, so re-applying a set drifts
further each time (measured on the demo model: 44, then 65, then 85 levels off). A call with one adapter
that matches no layer clears every layer, so such a call (`RESET`, a two-number file written here) goes
before each set of several adapters; with it, every set gives the same image however often and in whatever
order sets are applied. A restarted child holds no adapters: the applier notices the new epoch and loads
again.
"""

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from server.engines.sglang.errors import refused
from server.hooks import BASE_MODEL, LoRAApplier
from server.lora import (
    LoRAError,
    LoRASet,
    ParsedFiles,
    check_header,
    file_stamp,
    parse_lora,
    weight_shapes,
)

log = logging.getLogger("server.engines.sglang")

DIT_COMPONENTS = ("transformer", "transformer_2")  # what SGLang applies LoRAs to (Wan 2.2 A14B has two)
RESET = "image-server-reset"  # the nickname of the adapter that matches no layer (see the module docstring)


def _meta_module(folder: Path, class_name: str):
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise LoRAError(f"diffusers has no {class_name}")
    with torch.device("meta"):
        return cls.from_config(cls.load_config(folder))


class ModelSkeleton:
    """What `parse_lora` needs from a pipeline: its DiT components (on the meta device) and its key converter."""

    def __init__(self, folder: Path) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        self.components = {
            name: _meta_module(folder / name, index[name][1])
            for name in DIT_COMPONENTS
            if isinstance(index.get(name), list) and index[name][1]
        }
        if not self.components:
            raise LoRAError(f"{folder} has no transformer component")
        import diffusers

        self._convert = getattr(getattr(diffusers, index.get("_class_name", ""), None), "lora_state_dict", None)

    def lora_state_dict(self, state: dict, return_alphas: bool = True):
        """The pipeline class's conversion to diffusers keys, keeping the DiT's keys only."""
        alphas = None
        if self._convert is not None:
            converted = self._convert(state, return_alphas=True)
            state, alphas = converted if isinstance(converted, tuple) else (converted, None)
        kept = {k: v for k, v in state.items() if k.split(".", 1)[0] in self.components}
        return kept, alphas


class LoRAChecker:
    """Checks LoRA files against the model off the engine thread; the skeleton is built at the first check,
    verdicts kept by stamp (the parsed layers are not: SGLang reads the file itself)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._skeleton: ModelSkeleton | bool | None = False  # False: not built yet; None: cannot be built
        self._shapes: dict = {}
        self._building = threading.Lock()
        self.files = ParsedFiles(self._verdict)

    def check(self, path: Path) -> None:
        """Any thread but the engine's (LoRAError: why the file cannot apply)."""
        self.files.parse(path)

    def checked(self, path: Path) -> None:
        """The engine thread: the file as it is now passed `check` (it is not read again)."""
        self.files.parsed(path)

    def forget(self, path: Path) -> None:
        self.files.forget(path)

    def _verdict(self, path: Path) -> None:
        skeleton = self._build()
        if skeleton is None:
            check_header(path)  # without the model's layers, at least the bounds and the dtypes
            return
        parse_lora(skeleton, path, self._shapes, torch.bfloat16)

    def _build(self) -> ModelSkeleton | None:
        with self._building:
            return self._skeleton if self._skeleton is not False else self._build_now()

    def _build_now(self) -> ModelSkeleton | None:
        started = time.monotonic()
        try:
            self._skeleton = ModelSkeleton(self.folder)
        except (LoRAError, OSError, ValueError, TypeError) as exc:
            log.warning("LoRA files cannot be checked against %s (%s): SGLang will accept LoRAs that match no layer",
                        self.folder, exc)  # fmt: skip
            self._skeleton = None
            return None
        self._shapes = weight_shapes(self._skeleton)
        log.info("LoRA checks use %s's layers (built in %.1fs)", self.folder.name, time.monotonic() - started)
        return self._skeleton


def write_reset_lora(path: Path) -> Path:
    """A LoRA whose one layer exists in no model."""
    from safetensors.torch import save_file

    save_file({f"{RESET}.lora_A.weight": torch.zeros(1, 1), f"{RESET}.lora_B.weight": torch.zeros(1, 1)}, str(path))
    return path


def nickname(path: Path) -> str:
    """A name for SGLang's adapter cache: a replaced file (new size or mtime) is a new adapter."""
    digest = hashlib.sha1(f"{path.resolve()}|{file_stamp(path)}".encode()).hexdigest()[:12]
    return f"{path.stem[:48]}-{digest}"


class SGLangLoRAApplier(LoRAApplier):
    how = "applied by SGLang"

    def __init__(self, post: Callable[..., httpx.Response], process, checker: LoRAChecker, scratch: Path) -> None:
        super().__init__()
        self._post = post
        self._process = process
        self._checker = checker
        self._reset_path = write_reset_lora(scratch / f"{RESET}.safetensors")
        self._epoch = process.epoch
        self._loaded: set[str] = set()  # nicknames the running child holds

    def check(self, path: Path) -> None:
        self._checker.check(path)

    def forget(self, path: Path) -> None:
        self._checker.forget(path)

    def apply(self, loras: LoRASet) -> None:
        self._follow_restarts()
        super().apply(loras)

    def _follow_restarts(self) -> None:
        if self._process.epoch != self._epoch:
            self._epoch = self._process.epoch
            self._loaded.clear()
            self._applied = BASE_MODEL  # a new child starts with its base weights
            self.broken = False

    def _apply(self, loras: LoRASet) -> None:
        for path, _ in loras:
            self._checker.checked(path)
        if not loras:
            self._reset()
            return
        if len(loras) > 1:
            self._clear_layers()
        nicknames = [nickname(path) for path, _ in loras]
        body: dict = {
            "lora_nickname": nicknames,
            "lora_path": [None if n in self._loaded else str(p) for n, (p, _) in zip(nicknames, loras, strict=True)],
            "strength": [weight for _, weight in loras],
        }
        if len(loras) > 1:
            body["merge_mode"] = "merge"  # SGLang's dynamic mode takes one adapter per target
        response = self._post("/v1/set_lora", json=body)
        if response.status_code != 200:
            raise LoRAError(refused("the LoRA set", response))
        self._loaded.update(nicknames)

    def _clear_layers(self) -> None:
        """Every layer drops the adapters it holds (SGLang 0.5.23 workaround, see the module docstring)."""
        reset_path = None if RESET in self._loaded else str(self._reset_path)
        response = self._post("/v1/set_lora", json={"lora_nickname": RESET, "lora_path": reset_path})
        if response.status_code != 200:
            raise LoRAError(refused("to clear the previous LoRA set", response))
        self._loaded.add(RESET)

    def _reset(self) -> None:
        """Unmerging gives the base weights back bit for bit (and clears a failed set_lora, SGLang 0.5.23)."""
        response = self._post("/v1/unmerge_lora_weights", json={})
        if response.status_code != 200:
            raise LoRAError(refused("to restore the base weights", response))
