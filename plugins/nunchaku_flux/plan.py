"""What the Nunchaku path does on this machine: run (which file, which precision), fall back, or refuse.

Pure decisions from the settings, the GPU and the package found (tested
without a GPU). Nunchaku's own `get_precision()` says "int4" for any GPU that
is not sm_120/121, Hopper included, and only its loader refuses; so the
compute capability is checked here, before anything is loaded:

  12.0, 12.1 (RTX 50xx, RTX PRO Blackwell)         fp4
  7.5, 8.0, 8.6, 8.9 (Turing, Ampere, Ada)          int4 (Turing: fp16 and Nunchaku's fp16 attention)
  9.0 (H100/H200), 10.x (B200), others, no GPU      none: refuse, or NUNCHAKU_FALLBACK=fp8|bf16

Reasons of the machine (GPU, package) may fall back; mistakes in the
configuration (a missing file, the file for the other precision) never do.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from plugins.nunchaku_flux.package import Package, package_aside, problem
from server.hooks import FP8_MIN_CAPABILITY, GPU

INT4_SMS = (75, 80, 86, 89)
FP4_SMS = (120, 121)
_FILE = re.compile(r"^svdq-(int4|fp4)_r(\d+)-(.+)\.safetensors$")
_WEIGHT_DTYPES = {"int4": "int4", "fp4_e2m1_all": "fp4"}


@dataclass(frozen=True)
class Run:
    """Run Nunchaku: which file, at which precision, how."""

    precision: str  # "int4" or "fp4"
    file: Path
    dtype: str  # "bf16", or "fp16" on Turing
    fp16_attention: bool
    t5: Path | None
    offload: bool
    cache_threshold: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fallback:
    """Nunchaku cannot run on this machine; serve with the FP8 path or bf16 instead, as NUNCHAKU_FALLBACK says."""

    to: str  # "fp8" or "bf16"
    reason: str


@dataclass(frozen=True)
class Refusal:
    message: str


def precision_for(gpu: GPU | None) -> str | None:
    if gpu is None:
        return None
    if gpu.sm in FP4_SMS:
        return "fp4"
    if gpu.sm in INT4_SMS:
        return "int4"
    return None


def hardware_problem(gpu: GPU | None) -> str:
    """Why Nunchaku cannot run on this GPU (called when precision_for gave None)."""
    if gpu is None:
        return (
            "this machine has no CUDA GPU, and Nunchaku's 4-bit kernels run only on NVIDIA GPUs (INT4 on Turing, "
            "Ampere and Ada, compute capability 7.5 to 8.9; FP4 on Blackwell RTX 50xx / RTX PRO, 12.x)"
        )
    if gpu.capability[0] == 9:
        return f"{gpu.describe()} is a Hopper GPU, which has no 4-bit tensor cores: Nunchaku has no kernels for it"
    if gpu.capability[0] == 10:
        return (
            f"{gpu.describe()} is a data-center Blackwell GPU: Nunchaku builds its FP4 kernels only for "
            "compute capability 12.x (RTX 50xx, RTX PRO Blackwell) and has none for it"
        )
    return (
        f"{gpu.describe()} is not a GPU Nunchaku supports (INT4: compute capability 7.5, 8.0, 8.6, 8.9; "
        "FP4: 12.0, 12.1)"
    )


def alternatives(gpu: GPU | None) -> str:
    if gpu is not None and gpu.capability >= FP8_MIN_CAPABILITY:
        return (
            "Use the FP8 path instead (unset NUNCHAKU_TRANSFORMER; FP8=1 COMPILE=1) or plain bf16 (unset "
            "NUNCHAKU_TRANSFORMER), or set NUNCHAKU_FALLBACK=fp8 (or bf16) to do so automatically where Nunchaku "
            "cannot run."
        )
    plain = "fp32 on this CPU" if gpu is None else "bf16"
    return (
        f"Serve the model without Nunchaku ({plain}: unset NUNCHAKU_TRANSFORMER), or set NUNCHAKU_FALLBACK=bf16 to "
        "do so automatically where Nunchaku cannot run."
    )


# -- files -----------------------------------------------------------------


def file_precision(path: Path) -> str | None:
    """ "int4" or "fp4", from the quantization config Nunchaku stores in the file, else from its name."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            config = json.loads((f.metadata() or {}).get("quantization_config") or "{}")
        found = _WEIGHT_DTYPES.get(config.get("weight", {}).get("dtype"))
        if found:
            return found
    except (OSError, ValueError, AttributeError, json.JSONDecodeError):
        pass
    match = _FILE.match(path.name)
    return match[1] if match else None


def file_for(path: Path, precision: str) -> str:
    """The name of the `precision` file that goes with `path` (the same model and rank)."""
    match = _FILE.match(path.name)
    if match:
        return f"svdq-{precision}_r{match[2]}-{match[3]}.safetensors"
    return f"svdq-{precision}_r32-flux.1-dev.safetensors"


def _repo_hint(name: str) -> str:
    match = _FILE.match(name)
    if not match:
        return ""
    return f" (from the Hugging Face repo nunchaku-tech/nunchaku-{match[3]})"


def candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("svdq-*.safetensors") if p.is_file())


def config_problem(setting: str, t5: str) -> str | None:
    """Mistakes in the paths, whatever the machine (these never fall back)."""
    path = Path(setting).expanduser()
    if not path.exists():
        return f"NUNCHAKU_TRANSFORMER={setting!r} does not exist."
    if path.is_dir() and not candidates(path):
        return f"NUNCHAKU_TRANSFORMER={setting!r} is a folder without svdq-{{int4|fp4}}_r32-flux.1-*.safetensors files."
    if path.is_file() and path.suffix not in (".safetensors", ".sft"):
        return f"NUNCHAKU_TRANSFORMER={setting!r} is not a .safetensors file."
    if t5 and not Path(t5).expanduser().is_file():
        return f"NUNCHAKU_T5={t5!r} is not a file (Nunchaku's awq-int4-flux.1-t5xxl.safetensors)."
    return None


def pick_file(setting: str, precision: str, gpu: GPU) -> Path | str:
    """The transformer file for `precision`, or the message refusing the configured one."""
    path = Path(setting).expanduser()
    if path.is_dir():
        matching = [p for p in candidates(path) if file_precision(p) == precision]
        if len(matching) == 1:
            return matching[0]
        if not matching:
            names = ", ".join(p.name for p in candidates(path))
            wanted = file_for(candidates(path)[0], precision)
            return (
                f"NUNCHAKU_TRANSFORMER={setting!r} holds no {precision.upper()} file ({names}), and "
                f"{gpu.describe()} needs {precision.upper()}: add {wanted}{_repo_hint(wanted)}."
            )
        return (
            f"NUNCHAKU_TRANSFORMER={setting!r} holds several {precision.upper()} files "
            f"({', '.join(p.name for p in matching)}); point it at one of them."
        )
    found = file_precision(path)
    if found == precision:
        return path
    wanted = file_for(path, precision)
    what = f"is {found.upper()}" if found else "has no recognisable precision"
    return (
        f"NUNCHAKU_TRANSFORMER={path.name} {what}, but {gpu.describe()} needs {precision.upper()}: use {wanted}"
        f"{_repo_hint(wanted)} instead, or a folder holding both files."
    )


# -- the decision ------------------------------------------------------------


def decide(settings, config, gpu: GPU | None, package: Package, torch_version: str, python: tuple[int, int]):
    """Run, Fallback or Refusal for NUNCHAKU_TRANSFORMER on this machine (`settings`: the server's; `config`:
    the plugin's NunchakuSettings)."""
    if settings.fp8 or settings.compile:
        return Refusal(
            "NUNCHAKU_TRANSFORMER and FP8/COMPILE are two different paths: choose one. NUNCHAKU_FALLBACK=fp8 "
            "runs FP8 + compile where Nunchaku cannot run."
        )
    mistake = config_problem(config.nunchaku_transformer, config.nunchaku_t5)
    if mistake:
        return Refusal(mistake)
    fallback = config.nunchaku_fallback
    precision = precision_for(gpu)
    if precision is None:  # the GPU decides first: the refusal says so whether or not the package is there
        return _cannot_run(hardware_problem(gpu), fallback, gpu, package_aside(package))
    reason = problem(package, torch_version, python)
    if reason:
        return _cannot_run(reason, fallback, gpu)
    chosen = pick_file(config.nunchaku_transformer, precision, gpu)
    if isinstance(chosen, str):
        return Refusal(chosen)
    turing = gpu.sm == 75
    notes = ("Turing: fp16 weights and Nunchaku's fp16 attention (bf16 is not supported there)",) if turing else ()
    return Run(
        precision=precision,
        file=chosen,
        dtype="fp16" if turing else "bf16",
        fp16_attention=config.nunchaku_fp16_attention or turing,
        t5=Path(config.nunchaku_t5).expanduser() if config.nunchaku_t5 else None,
        offload=settings.cpu_offload,
        cache_threshold=settings.cache_threshold,
        notes=notes,
    )


def _cannot_run(reason: str, fallback: str, gpu: GPU | None, aside: str = ""):
    if fallback in ("fp8", "bf16"):
        return Fallback(fallback, reason)
    note = f" (Besides, {aside}.)" if aside else ""
    return Refusal(f"NUNCHAKU_TRANSFORMER is set, but {reason.rstrip('.')}. {alternatives(gpu)}{note}")
