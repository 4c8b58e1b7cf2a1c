"""Every setting, in one place: a CLI flag and an environment variable of the same name.

The container is configured by environment, a developer by flags; a flag wins
over its variable, the variable over the default. `image-server serve --help`
prints this table.
"""

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


def _opt(default, help: str, env: str = "", flag: str = "", choices: tuple = ()):
    return field(default=default, metadata={"help": help, "env": env, "flag": flag, "choices": choices})


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "image-server"


@dataclass(frozen=True)
class Settings:
    # Model and engine
    model: str = _opt(
        "demo", "local diffusers folder of the model, or 'demo' for the embedded tiny FLUX", env="MODEL_PATH"
    )
    engine: str = _opt("diffusers", "generation engine", choices=("diffusers", "sglang"))
    model_name: str = _opt("", "model id shown in /v1/models (default: the folder name)")
    device: str = _opt("auto", "torch device: auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: str = _opt(
        "auto", "weights dtype: auto (bf16 on GPU, fp32 on CPU)", choices=("auto", "bf16", "fp16", "fp32")
    )
    allow_download: bool = _opt(False, "let Hugging Face downloads happen (HF_HUB_OFFLINE=1 otherwise)")
    cache_dir: Path = _opt(_default_cache(), "where the demo model and other built artefacts are cached")
    num_gpu_instances: int = _opt(1, "server instances sharing this host; torch threads = CPUs / instances")
    torch_threads: int = _opt(0, "torch CPU threads (0: derived from CPU count and NUM_GPU_INSTANCES)")
    warmup: bool = _opt(True, "run one small generation before reporting ready")

    # GPU fast paths (README, "GPU fast paths")
    fp8: bool = _opt(
        False, "FP8 weights and activations on the transformer's linear layers (torchao); compute capability >= 8.9"
    )
    compile: bool = _opt(False, "torch.compile the transformer, with fused QKV projections (slow first start)")
    compile_mode: str = _opt(
        "default",
        "torch.compile mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    compile_scope: str = _opt(
        "blocks",
        "what torch.compile compiles: blocks (each repeated transformer block once, reused: minutes faster to "
        "start) or model (the whole transformer as one graph)",
        choices=("blocks", "model"),
    )
    attention: str = _opt(
        "auto",
        "attention kernel: auto (FlashAttention 3 on Hopper where installed, else PyTorch SDPA) or a diffusers "
        "backend name (native, _flash_3, flash, sage, ...)",
    )
    cache_threshold: float = _opt(
        0.0, "first-block cache: reuse the remaining blocks' output while the first block changes less (0.12; 0: off)"
    )
    cpu_offload: bool = _opt(False, "keep the weights in CPU memory and move each model to the GPU to run (small GPUs)")
    lora_hotswap_rank: int = _opt(
        64, "with FP8 or COMPILE and the lora plugin: rank of the hot-swapped LoRA slot (a set's ranks add up)"
    )
    nunchaku_transformer: str = _opt(
        "", "Nunchaku 4-bit FLUX transformer: an svdq-{int4|fp4}_r32-flux.1-*.safetensors file or a folder of both"
    )
    nunchaku_fallback: str = _opt(
        "none",
        "where Nunchaku cannot run (Hopper, B200, no GPU, no package): none (refuse to start), "
        "fp8 (FP8 + compile), bf16",
        choices=("none", "fp8", "bf16"),
    )
    nunchaku_fp16_attention: bool = _opt(False, "Nunchaku's FP16 attention (faster on RTX 30/40/50; always on Turing)")
    nunchaku_t5: str = _opt("", "Nunchaku's 4-bit T5 text encoder file (awq-int4-flux.1-t5xxl.safetensors)")

    # SGLang engine (ENGINE=sglang)
    sglang_bin: str = _opt(
        "", "the sglang executable, in its own venv (default: CACHE_DIR/sglang-0.5.23/bin/sglang, else PATH)"
    )
    sglang_args: str = _opt("", "extra `sglang serve` flags, shell-quoted; they override the server's own")
    sglang_port: int = _opt(0, "loopback port of the SGLang child (0: a free one); SGLang also binds port+1")
    sglang_model_id: str = _opt("", "model family / SGLang --model-id, e.g. FLUX.1-dev (default: from the folder)")
    sglang_start_timeout: float = _opt(900.0, "seconds SGLang may take to become healthy (model load and warm-up)")

    # HTTP
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    api_key: str = _opt("", "comma-separated API keys; when set, /v1/* needs 'Authorization: Bearer <key>'")
    public_url: str = _opt("", "external base URL used in image URLs (default: from the request and X-Forwarded-*)")
    max_body_mb: float = _opt(64.0, "largest request body accepted, in MiB (larger: 413 before reading it all)")
    max_image_mb: float = _opt(50.0, "largest input image file, in MiB")
    remote_image_hosts: str = _opt("", "comma-separated hosts that edits may fetch http(s) image URLs from")
    log_json: bool = _opt(False, "log one JSON object per line")
    log_level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))

    # Requests
    default_size: str = _opt("1024x1024", "size used for size=auto or when none is given")
    min_pixels: int = _opt(64 * 64, "smallest width*height accepted")
    max_pixels: int = _opt(2048 * 2048, "largest width*height accepted")
    max_side: int = _opt(4096, "longest side accepted, in pixels")
    default_steps: int = _opt(0, "inference steps when a request gives none (0: from the model, 28 or 4 for schnell)")
    max_steps: int = _opt(100, "most inference steps a request may ask for")
    default_guidance: float = _opt(-1.0, "guidance scale when a request gives none (negative: from the model)")
    jpeg_quality: int = _opt(65, "JPEG/WebP quality when output_compression is not given")
    image_ttl: int = _opt(3600, "seconds an image fetched by URL (response_format=url) is kept")
    image_dir: Path = _opt(Path(""), "where images served by URL are stored (default: CACHE_DIR/images)")

    # Scheduler
    max_queue: int = _opt(100, "requests waiting at most; more are refused with 429")
    max_batch: int = _opt(4, "images per pipeline call at most")
    batch_window_ms: float = _opt(10.0, "how long a partial batch waits for companions while others are in flight")
    max_bypass: int = _opt(4, "times a request may be passed over for one that needs no pipeline change")
    request_timeout: float = _opt(600.0, "seconds a request may wait and run before it ends with a timeout")
    drain_timeout: float = _opt(120.0, "seconds SIGTERM waits for queued and running work before exiting")
    postprocess_workers: int = _opt(2, "threads for post-processing (plugins, encoding) beside the engine")

    # Plugins
    plugins: str = _opt("", "comma-separated plugins to enable, e.g. lora,nsfw,upload,upscale")
    admin_api_key: str = _opt("", "comma-separated keys allowed to manage LoRAs (POST/DELETE /v1/loras)")
    lora_dir: Path = _opt(Path("loras"), "folder of LoRA .safetensors files; a LoRA's name is its file name")
    lora_defaults: str = _opt("", "LoRA set used when a request names none, e.g. 'style:1.0,detail:0.7,grain:0.5'")
    max_loras: int = _opt(3, "most LoRAs one request may merge")
    lora_max_mb: float = _opt(1024.0, "largest LoRA file accepted by POST /v1/loras, in MiB")
    nsfw_model_path: Path = _opt(Path(""), "local folder of the NSFW classifier (Falconsai/nsfw_image_detection)")
    nsfw_check: bool = _opt(True, "check images when a request does not say (nsfw_check)")
    nsfw_threshold: float = _opt(0.5, "nsfw probability at or above which an image is flagged")
    nsfw_timeout: float = _opt(5.0, "seconds the NSFW check may take; past it the image is flagged (fail closed)")
    nsfw_action: str = _opt("flag", "what to do with a flagged image", choices=("flag", "blur", "block"))
    upload_allowed_hosts: str = _opt(
        "", "hosts (or *.domain) trusted for upload_urls: private addresses and plain http allowed"
    )
    upload_timeout: float = _opt(60.0, "seconds one upload attempt may take")
    upload_retries: int = _opt(3, "retries of an upload after a connection error or a 5xx")

    @property
    def api_keys(self) -> tuple[str, ...]:
        return _split(self.api_key)

    @property
    def remote_hosts(self) -> tuple[str, ...]:
        return _split(self.remote_image_hosts)

    @property
    def plugin_names(self) -> tuple[str, ...]:
        return _split(self.plugins)

    @property
    def admin_keys(self) -> tuple[str, ...]:
        return _split(self.admin_api_key)

    @property
    def upload_hosts(self) -> tuple[str, ...]:
        return _split(self.upload_allowed_hosts)

    @property
    def images_path(self) -> Path:
        return self.image_dir if str(self.image_dir) not in ("", ".") else self.cache_dir / "images"


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def env_name(f: dataclasses.Field) -> str:
    return f.metadata.get("env") or f.name.upper()


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(Settings)
    kind = hints[f.name]
    if isinstance(kind, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Settings):
        kind = _field_type(f)
        env = env_name(f)
        raw = os.environ.get(env)
        help_text = f"{f.metadata['help']} [env {env}; default {f.default!s}]"
        kwargs: dict = {"dest": f.name, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            default = _parse_bool(raw) if raw is not None else f.default
            parser.add_argument(_flag(f), action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        default = kind(raw) if raw is not None else f.default
        parser.add_argument(_flag(f), type=kind, default=default, metavar=env, **kwargs)


def from_namespace(ns: argparse.Namespace) -> Settings:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(Settings)}
    return Settings(**values)


def from_env(**overrides) -> Settings:
    """Settings from the environment alone (tests and benchmarks build apps this way)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return dataclasses.replace(from_namespace(parser.parse_args([])), **overrides)
