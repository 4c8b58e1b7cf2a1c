"""LoRA files: what both the LoRA plugin and the engines need to read and check them.

A LoRA set is what a request asks for: `((path, weight), ...)`, sorted by path, no zero weights. How a set
gets into the model belongs to the engine (merged weights, a hot-swapped slot, Nunchaku's compose, SGLang's
set_lora); every way is a `LoRAApplier` (server/hooks.py), whose base class keeps the one promise they share:
a set is applied completely or not at all, and a failure leaves the exact base model and true bookkeeping
behind.

`parse_lora` is the one reader of LoRA files. A file it accepts is a file that applies: every layer it
names exists with the shape the LoRA says, every A/B pair agrees on its rank, biases, alphas and metadata
have the right types, every value is finite, and merged at the largest weight a request may give it (with a
full set of such LoRAs) no weight leaves the model's dtype.

LoRA files are untrusted bytes (an admin's upload, a file in LORA_DIR, named by any request), so reading one
is bounded before any library parses it: `check_header` reads the header's length (the first 8 bytes) and
refuses a header over MAX_HEADER_BYTES or naming more than MAX_TENSORS tensors, and any dtype but a float one,
before safetensors, which parses headers of up to 100 MB holding the GIL (measured: 22 s of a frozen /health
for 90 MB of `__metadata__`), sees it. And it happens off the engine thread: an applier's `check` runs in a
worker when a request is planned, an upload is checked or the defaults load, and fills `ParsedFiles`, a
cache keyed by the file's stamp; `apply`, on the engine thread, takes what was parsed and reads no file. A
file deleted or replaced after its request was accepted is refused there, naming the LoRA (never a path).
"""

import json
import logging
import math
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors.torch import load_file

from server.config import MOST_LORAS

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_WEIGHT = 10.0  # the largest |weight| a request may give one LoRA (the `loras` field's bound)
# A LoRA's tensor table is a few hundred KB (FLUX with its text encoders: ~2,000 tensors); training metadata
# adds some. Parsing 2 MiB of JSON holds the GIL for tens of milliseconds; more is refused unread.
MAX_HEADER_BYTES = 2 * 2**20
MAX_TENSORS = 8192
MAX_ADAPTER_METADATA = 64 * 2**10  # diffusers' lora_adapter_metadata: a PEFT config of about 1 KB
# Read as float32; every other dtype a safetensors file may name (integers, BOOL, complex, F4/F6, the exponent-only
# F8_E8M0 of scales) is refused by name.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
PARSING = threading.BoundedSemaphore(1)  # LoRA files parsed at once (each costs a core and its size in memory)

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
    """(mtime in ns, size): a file replaced under the same name gets a new stamp. LoRAError if it is gone."""
    try:
        stat = path.stat()
    except OSError as exc:
        log.info("LoRA file %s: %s", path, exc)
        raise unreadable(path) from None
    return stat.st_mtime_ns, stat.st_size


def unreadable(path: Path) -> LoRAError:
    """What a caller learns of a file that vanished or cannot be read: its LoRA name, never the path."""
    return LoRAError(f"the LoRA file '{Path(path).stem}' was deleted or cannot be read")


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


def check_header(path: Path) -> dict[str, str]:
    """The file's `__metadata__`, once its header passed the bounds: its size, its tensor count, every tensor's
    dtype a float one. Reads 8 bytes, then at most MAX_HEADER_BYTES; OSError if the file cannot be read."""
    with path.open("rb") as f:
        prefix = f.read(8)
        size = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or size < 2:
            raise LoRAError("not a readable .safetensors file (no header)")
        if size > MAX_HEADER_BYTES:
            raise LoRAError(
                f"its header is {size / 2**20:.1f} MiB, more than the {MAX_HEADER_BYTES // 2**20} MiB this server "
                "reads (strip its training metadata, see docs/SECURITY.md)"
            )
        raw = f.read(size)
    if len(raw) < size:
        raise LoRAError("not a readable .safetensors file (its header is cut short)")
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # one per tensor: a quote inside a JSON string is escaped
        raise LoRAError(f"it names more than {MAX_TENSORS} tensors")
    try:
        header = json.loads(raw)
    except ValueError:
        raise LoRAError("not a readable .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoRAError("not a readable .safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoRAError("its __metadata__ is not a map of strings")
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in FLOAT_DTYPES:
            raise LoRAError(
                f"tensor {name[:200]!r} holds {str(dtype)[:20]} values; a LoRA's weights are floating point "
                f"({', '.join(FLOAT_DTYPES)})"
            )
    return metadata


def _metadata_alpha(metadata: dict[str, str]) -> float | None:
    """diffusers/PEFT files may keep one alpha for the transformer in the header's metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    if len(raw) > MAX_ADAPTER_METADATA:
        raise LoRAError(f"its lora_adapter_metadata is larger than {MAX_ADAPTER_METADATA // 1024} KiB")
    try:
        adapter = json.loads(raw)
    except ValueError:
        raise LoRAError("its lora_adapter_metadata is not JSON") from None
    if not isinstance(adapter, dict):
        raise LoRAError("its lora_adapter_metadata is not a JSON object")
    alpha = adapter.get("transformer.lora_alpha")
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
    """Every tensor as float32, checked finite, and the metadata's alpha. OSError if the file cannot be read."""
    alpha = _metadata_alpha(check_header(path))
    try:
        state = load_file(str(path))
    except OSError:
        raise
    except Exception as exc:  # safetensors' own errors: offsets or sizes that do not match the header
        log.info("LoRA file %s: safetensors cannot read it: %s", path, exc)
        raise LoRAError("not a readable .safetensors file (its tensors do not match its header)") from None
    floats = {}
    for key, tensor in state.items():
        floats[key] = tensor.float()
        if not bool(torch.isfinite(floats[key]).all()):
            raise LoRAError(f"{key} holds values that are not finite (inf or nan, or beyond 32-bit floats)")
    return floats, alpha


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
        log.info("LoRA key conversion failed: %r", exc)
        raise LoRAError("not a LoRA this model's loader understands (its keys are in no format it converts)") from None
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


def largest_change(layer: LoRALayer) -> float:
    """A bound on what the layer adds to any weight at weight 1, and on its factors as a slot keeps them (the
    scaled A, and B): an entry of B @ A is at most |its row of B| x |its column of A|. In float64: the norms of
    float32 values cannot overflow there."""
    rows = torch.linalg.vector_norm(layer.up, dim=1, dtype=torch.float64).max()
    columns = torch.linalg.vector_norm(layer.down, dim=0, dtype=torch.float64).max()
    parts = [layer.scale * rows * columns, layer.scale * layer.down.abs().max().double(), layer.up.abs().max().double()]
    if layer.bias is not None:
        parts.append(layer.scale * layer.bias.abs().max().double())
    return float(max(parts))


def check_range(layers: Layers, dtype: torch.dtype) -> None:
    """Refuse a LoRA that could merge to inf: at the largest weight a request may give it, a full set of such
    LoRAs must leave every weight within `dtype`, with half its range left for the base weight (a finite file
    whose product overflows gave all-black images)."""
    limit = torch.finfo(dtype).max / (2 * MOST_LORAS * MAX_WEIGHT)
    for (component, module), layer in layers.items():
        change = largest_change(layer)
        if not change <= limit:
            raise LoRAError(
                f"{component}.{module}: its values are too large: at weight {MAX_WEIGHT:g} it could change a "
                f"weight by {change * MAX_WEIGHT:.3g}, and the model's {str(dtype).removeprefix('torch.')} weights "
                "would overflow"
            )


def parse_lora(pipe, path: Path, shapes: Shapes | None = None, dtype: torch.dtype = torch.float32) -> Layers:
    """(component, module path) -> LoRALayer, every part checked against the pipeline's layers and `dtype`.

    `pipe` gives the key conversion (`lora_state_dict`) and, without `shapes`, the layers. `shapes` (from
    `weight_shapes`, taken earlier) stands in for the pipeline's modules when those have been rewritten since
    (FP8-quantized, wrapped by PEFT): LoRA files name the original layers. OSError if the file cannot be read."""
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
    check_range(layers, dtype)
    return layers


class ParsedFiles(Generic[T]):
    """What `parse` makes of each file, once per stamp (a replaced file is parsed again), off the engine thread
    and one file at a time; the engine thread takes it with `parsed` and reads no file. A file's LoRAError is
    kept as its verdict; anything else (a read error, memory) is tried again by the next caller."""

    def __init__(self, parse: Callable[[Path], T]) -> None:
        self._parse = parse
        self._lock = threading.Lock()
        self._entries: dict[Path, tuple[tuple[int, int], Future]] = {}

    def parse(self, path: Path) -> T:
        """Any thread but the engine's: the file's parse (LoRAError: why it cannot apply)."""
        stamp = file_stamp(path)
        with self._lock:
            entry = self._entries.get(path)
            mine = entry is None or entry[0] != stamp
            if mine:
                entry = self._entries[path] = (stamp, Future())
        if mine:
            self._fill(path, entry[1])
        return _outcome(entry[1])

    def parsed(self, path: Path) -> T:
        """The engine thread: what `parse` made of the file as it is now."""
        entry = self._entries.get(path)
        if entry is None or entry[0] != file_stamp(path) or not entry[1].done():
            raise LoRAError(f"'{path.stem}' was replaced after the request was accepted; send the request again")
        return _outcome(entry[1])

    def forget(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(path, None)

    def _fill(self, path: Path, future: Future) -> None:
        try:
            with PARSING:
                future.set_result(self._parse(path))
            return
        except LoRAError as exc:
            future.set_result(exc)  # the file's verdict, kept while its stamp holds
            return
        except OSError as exc:
            log.info("LoRA file %s cannot be read: %s", path, exc)
            error: BaseException = unreadable(path)
        except BaseException as exc:
            error = exc
        with self._lock:
            if self._entries.get(path, (None, None))[1] is future:
                del self._entries[path]
        future.set_exception(error)


def _outcome(future: Future):
    """A kept verdict is raised as a new LoRAError each time (one raised again and again grows its traceback)."""
    result = future.result()
    if isinstance(result, LoRAError):
        raise LoRAError(str(result))
    return result
