"""LoRA files and the `LoRAApplier` interface: what both the LoRA plugin and the engines need.

A LoRA set is what a request asks for: `((path, weight), ...)`, sorted by path, no zero weights. How a set
gets into the model belongs to the engine (merged weights, a hot-swapped slot, Nunchaku's compose, SGLang's
set_lora); every way is a `LoRAApplier`, and the base class keeps the one promise they share: a set is
applied completely or not at all, and a failure leaves the exact base model and true bookkeeping behind.

`parse_lora` is the one reader of LoRA files. A file it accepts is a file that applies: every layer it
names exists with the shape the LoRA says, every A/B pair agrees on its rank, biases, alphas and metadata
have the right types and every value is finite.
"""

import json
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)

LoRASet = tuple[tuple[Path, float], ...]
# What an applied set computes: each file's resolved path and stamp (a file replaced under the same name is
# another set) with its weight.
SetKey = tuple[tuple[str, int, int, float], ...]

_PART = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|alpha)$")
_RAW_SUFFIX = re.compile(r"\.(lora_[AB]\.weight|lora_B\.bias|lora_down\.weight|lora_up\.weight|alpha)$")


class LoRAError(ValueError):
    """A LoRA file that cannot be applied to this model (the message says why)."""


@dataclass
class LoRALayer:
    down: torch.Tensor  # A: (rank, in), float32
    up: torch.Tensor  # B: (out, rank), float32
    scale: float  # alpha / rank
    bias: torch.Tensor | None = None  # (out,), float32


# component -> module path -> weight shape
Shapes = dict[str, dict[str, tuple[int, ...]]]
# (component, module path) -> layer
Layers = dict[tuple[str, str], LoRALayer]


def file_stamp(path: Path) -> tuple[int, int]:
    """(mtime in ns, size): a file replaced under the same name gets a new stamp."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def set_key(loras: LoRASet) -> SetKey:
    return tuple((str(Path(path).resolve()), *file_stamp(Path(path)), float(weight)) for path, weight in loras)


def describe(loras: LoRASet) -> str:
    return ", ".join(f"{Path(p).stem}:{w:g}" for p, w in loras) or "none"


def weight_shapes(pipe) -> Shapes:
    """Every module of the pipeline that has a weight, with its shape (the layers as LoRA files name them)."""
    shapes: Shapes = {}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        shapes[name] = {
            module: tuple(m.weight.shape)
            for module, m in component.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)
        }
    return shapes


# -- reading a file ------------------------------------------------------------


def _metadata_alpha(path: Path) -> float | None:
    """diffusers/PEFT files may keep one alpha for the transformer in the header's metadata."""
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        metadata = json.loads(raw)
    except ValueError:
        raise LoRAError("its lora_adapter_metadata is not JSON") from None
    if not isinstance(metadata, dict):
        raise LoRAError("its lora_adapter_metadata is not a JSON object")
    alpha = metadata.get("transformer.lora_alpha")
    return None if alpha is None else _alpha_value(alpha, "transformer.lora_alpha in its metadata")


def _alpha_value(value: object, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise LoRAError(f"{where} is not one number")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LoRAError(f"{where} is not a number")
    if not math.isfinite(value) or value <= 0:
        raise LoRAError(f"{where} must be a positive finite number, not {value}")
    return float(value)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], float | None]:
    try:
        state = load_file(str(path))
        alpha = _metadata_alpha(path)
    except LoRAError:
        raise
    except Exception as exc:  # safetensors raises its own errors, OSError, or worse on a damaged header
        raise LoRAError(f"not a readable .safetensors file ({type(exc).__name__}: {exc})") from None
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise LoRAError(f"{key} holds {tensor.dtype} values, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise LoRAError(f"{key} holds values that are not finite (inf or nan)")
    return state, alpha


def normalize_keys(state: dict[str, torch.Tensor], transformer_modules: set[str]) -> dict[str, torch.Tensor]:
    """Give bare and PEFT-saved (`base_model.model.`) transformer keys the `transformer.` prefix.

    diffusers loads nothing, silently, for keys without the component prefix."""
    out = {}
    for key, value in state.items():
        bare = key.removeprefix("base_model.model.")
        if _RAW_SUFFIX.sub("", bare) in transformer_modules:
            key = "transformer." + bare
        out[key] = value
    return out


def _convert(pipe, raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """The pipeline's own conversion to diffusers keys (kohya, xlabs, PEFT...)."""
    try:
        converted = pipe.lora_state_dict(raw, return_alphas=True)
    except Exception as exc:  # the converters assert, index and reshape freely on files they do not expect
        raise LoRAError(f"not a LoRA this model's loader understands ({type(exc).__name__}: {exc})") from None
    # FLUX's loader returns (state, alphas); the other families' fold alphas into the weights and return the state
    state, alphas = converted if isinstance(converted, tuple) else (converted, {})
    return state, alphas or {}


# -- checking it against the model -------------------------------------------------


def _layer(state: dict, alphas: dict, prefix: str, target: tuple[int, ...], default_alpha: float | None) -> LoRALayer:
    """One layer's A, B, bias and alpha, checked against the weight it changes."""
    down, up = state[prefix + ".lora_A.weight"], state.get(prefix + ".lora_B.weight")
    if up is None:
        raise LoRAError(f"{prefix}.lora_A has no lora_B")
    if down.ndim != 2 or up.ndim != 2:
        raise LoRAError(f"{prefix}: lora_A and lora_B must be matrices, not {down.ndim}-D and {up.ndim}-D")
    rank = down.shape[0]
    if rank == 0 or up.shape[1] != rank:
        raise LoRAError(f"{prefix}: lora_A has rank {rank} but lora_B has rank {up.shape[1]}")
    if len(target) != 2 or (up.shape[0], down.shape[1]) != target:
        raise LoRAError(f"{prefix}: LoRA shape {up.shape[0]}x{down.shape[1]} does not fit {target}")
    bias = state.get(prefix + ".lora_B.bias")
    if bias is not None and tuple(bias.shape) != (target[0],):
        raise LoRAError(f"{prefix}: lora_B bias of shape {tuple(bias.shape)} does not fit {target[0]} outputs")
    alpha = alphas.get(prefix + ".alpha", default_alpha)
    scale = _alpha_value(alpha, f"{prefix}.alpha") / rank if alpha is not None else 1.0
    return LoRALayer(down.float(), up.float(), scale, None if bias is None else bias.float())


def _check_keys(state: dict[str, torch.Tensor]) -> None:
    for key in state:
        if not _PART.search(key):
            raise LoRAError(f"key {key!r} is not a LoRA weight this server can apply")
        prefix = _PART.sub("", key)
        if key.endswith((".lora_B.weight", ".lora_B.bias")) and prefix + ".lora_A.weight" not in state:
            raise LoRAError(f"{prefix}.lora_B has no lora_A")


def parse_lora(pipe, path: Path, shapes: Shapes | None = None) -> Layers:
    """(component, module path) -> LoRALayer, every part checked against the pipeline's layers.

    `pipe` gives the key conversion (`lora_state_dict`) and, without `shapes`, the layers. `shapes` (from
    `weight_shapes`, taken earlier) stands in for the pipeline's modules when those have been rewritten since
    (FP8-quantized, wrapped by PEFT): LoRA files name the original layers."""
    shapes_now = shapes if shapes is not None else weight_shapes(pipe)
    raw, default_alpha = _read(path)
    state, alphas = _convert(pipe, normalize_keys(raw, set(shapes_now.get("transformer", {}))))
    _check_keys(state)
    layers: Layers = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key.removesuffix(".lora_A.weight")
        component, _, module = prefix.partition(".")
        if module not in shapes_now.get(component, {}):
            raise LoRAError(f"key {key!r} matches no layer of this model")
        layers[(component, module)] = _layer(state, alphas, prefix, shapes_now[component][module], default_alpha)
    if not layers:
        raise LoRAError("it holds no LoRA weights for any layer of this model (0 keys loaded)")
    return layers


class ParsedFiles:
    """Parsed LoRA files, cached by stamp: a switch reads no file, a replaced file is read again."""

    def __init__(self, pipe, shapes: Shapes | None = None) -> None:
        self.pipe = pipe
        self.shapes = shapes
        self._cache: dict[Path, tuple[tuple[int, int], Layers]] = {}

    def layers(self, path: Path) -> Layers:
        stamp = file_stamp(path)
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, parse_lora(self.pipe, path, self.shapes))
            self._cache[path] = cached
        return cached[1]

    def forget(self, path: Path) -> None:
        self._cache.pop(path, None)


# -- applying sets ------------------------------------------------------------------


class LoRAApplier(ABC):
    """How one engine applies LoRA sets. Engine thread only.

    check(path)   the file will apply to this model (LoRAError: why not)
    apply(loras)  make `loras` the applied set, all or nothing
    forget(path)  the file was deleted or replaced: drop what was cached of it
    install()     before the model is compiled (the hot-swapped slot reserves its tensors here)

    A subclass writes `_apply` (the set, checked before any weight changes where it can be) and `_reset`
    (back to the exact base model); the bookkeeping and the all-or-nothing rule live here."""

    how = "applied"  # for the log line

    def __init__(self) -> None:
        self._applied: SetKey | None = ()  # () the base model; None unknown (a reset failed)
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
        return self._applied

    def apply(self, loras: LoRASet) -> None:
        key = set_key(loras)
        if key == self._applied:
            return
        started = time.monotonic()
        try:
            self._apply(loras)
        except BaseException:
            self._undo()
            raise
        self._applied = key
        log.info("LoRA set [%s] %s in %.3fs", describe(loras), self.how, time.monotonic() - started)

    def _undo(self) -> None:
        self._applied = None
        try:
            self._reset()
        except Exception:
            self.broken = True
            log.exception("a failed LoRA set could not be undone: the engine stops serving")
            return
        self._applied = ()
