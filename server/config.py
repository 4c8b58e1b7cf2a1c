"""Every setting: a CLI flag and an environment variable of the same name, checked before anything starts.

The container is configured by environment, a developer by flags; a flag wins over its variable, the
variable over the default. The server's settings are `Settings`; a plugin declares its own in a dataclass
of `option`s, registered in the `image_server.settings` entry-point group under the plugin's name, so a
third-party plugin adds flags without touching this file, and `image-server serve --help` lists them all
without importing any plugin (nor torch). A value that does not parse, or is outside what its setting
accepts, stops the server with one line naming the variable and what it accepts.

This module imports nothing heavy: the CLI reads it before it knows whether it will serve.
"""

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

# ASCII digits only (`\d` and `$` would take "６４x６４" and a trailing newline), no leading zeros, 5 digits at most
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", re.ASCII)
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a gateway's tenant header, a TENANT_WEIGHTS name
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
MAX_TENANT_WEIGHT = 1000.0
SETTINGS_GROUP = "image_server.settings"
MAX_IMAGES = 10  # images one request may ask for (n, as OpenAI's): one upload URL each
MOST_LORAS = 16  # the most LoRAs one set may hold (MAX_LORAS's ceiling)


class ConfigError(ValueError):
    """Settings that cannot run; one line per problem."""


def option(
    default: Any,
    help: str,
    *,
    env: str = "",
    choices: tuple = (),
    low: float | None = None,
    high: float | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A setting: its default, its help, and what it accepts (choices, a range, or a check returning why not)."""
    metadata = {"help": help, "env": env, "choices": choices, "low": low, "high": high, "check": check}
    return field(default=default, metadata=metadata)


def parse_size(value: str) -> tuple[int, int] | None:
    """'1024x768' -> (1024, 768); None for anything else. The one size parser: settings, requests, engines."""
    match = _SIZE.fullmatch(value)
    return (int(match[1]), int(match[2])) if match else None


def size_problem(value: str) -> str | None:
    """Why `value` is not a WIDTHxHEIGHT of multiples of 16, or None."""
    size = parse_size(value)
    if size is None:
        return "a size WIDTHxHEIGHT, e.g. 1024x1024"
    if size[0] % 16 or size[1] % 16:
        return "a size whose width and height are positive multiples of 16"
    return None


def parse_quality_steps(text: str) -> dict[str, int]:
    """'low:12,medium:20,high:28' -> {'low': 12, ...}; ValueError naming what is wrong."""
    steps = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = (x.strip() for x in part.partition(":"))
        if name not in ("low", "medium", "high") or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{part!r} is not PRESET:STEPS with PRESET low, medium or high")
        steps[name] = int(count)
    return steps


def quality_steps_problem(value: str) -> str | None:
    try:
        parse_quality_steps(value)
    except ValueError:
        return "PRESET:STEPS pairs, e.g. 'low:12,medium:20,high:28'"
    return None


def parse_weights(text: str) -> dict[str, float]:
    """'key-3f2a9c1b0d4e:2,batch:0.5' -> {'key-3f2a9c1b0d4e': 2.0, 'batch': 0.5}; ValueError naming what is wrong."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = (x.strip() for x in part.partition(":"))
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not TENANT_NAME.fullmatch(name) or not 0 < value <= MAX_TENANT_WEIGHT:
            raise ValueError(f"{part!r} is not NAME:WEIGHT with a weight above 0 and at most {MAX_TENANT_WEIGHT:g}")
        weights[name] = value
    return weights


def weights_problem(value: str) -> str | None:
    try:
        parse_weights(value)
    except ValueError:
        highest = f"{MAX_TENANT_WEIGHT:g}"
        return f"NAME:WEIGHT pairs with weights above 0 and at most {highest}, e.g. 'key-3f2a9c1b0d4e:2,batch:0.5'"
    return None


def header_problem(value: str) -> str | None:
    return None if not value or _HEADER_NAME.fullmatch(value) else "an HTTP header name, e.g. X-Tenant"


# An allow-list entry (UPLOAD_ALLOWED_HOSTS, REMOTE_IMAGE_HOSTS): a name, *.domain, IPv4 or [IPv6] address, with
# an optional :port or :* (any port). Without one, only the scheme's default port (443, 80) is allowed: trusting
# a host's object store must not open its other services to requests that callers shape.
_HOST_ENTRY = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|(?:\*\.)?[a-z0-9_.-]+)(?::(?P<port>[0-9]{1,5}|\*))?", re.ASCII)
DEFAULT_PORTS = {"http": 80, "https": 443}


def hosts_problem(value: str) -> str | None:
    bad = [entry for entry in split(value) if not _HOST_ENTRY.fullmatch(entry.lower())]
    return f"hosts as host, *.domain, [IPv6], each with an optional :port or :* ({bad[0]!r} is none)" if bad else None


def host_allowed(entries: tuple[str, ...], scheme: str, host: str, port: int | None) -> bool:
    """Whether a URL's host and port are on an allow-list (entries as `_HOST_ENTRY` describes)."""
    host, port = host.lower().rstrip("."), port or DEFAULT_PORTS.get(scheme)
    for entry in entries:
        match = _HOST_ENTRY.fullmatch(entry.lower())
        if match is None:
            continue
        name = match["host"].strip("[]")
        if host != name and not (name.startswith("*.") and host.endswith(name[1:])):
            continue
        if match["port"] == "*" or (int(match["port"]) if match["port"] else DEFAULT_PORTS.get(scheme)) == port:
            return True
    return False


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "image-server"


@dataclass(frozen=True)
class Settings:
    # Model and engine
    model: str = option(
        "demo", "local diffusers folder of the model, or 'demo' for the embedded tiny FLUX", env="MODEL_PATH"
    )
    engine: str = option("diffusers", "generation engine", choices=("diffusers", "sglang"))
    model_name: str = option("", "model id shown in /v1/models (default: the folder name)")
    device: str = option("auto", "torch device: auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: str = option(
        "auto", "weights dtype: auto (bf16 on GPU, fp32 on CPU)", choices=("auto", "bf16", "fp16", "fp32")
    )
    allow_download: bool = option(False, "let Hugging Face downloads happen (HF_HUB_OFFLINE=1 otherwise)")
    cache_dir: Path = option(_default_cache(), "where the demo model and other built artefacts are cached")
    num_gpu_instances: int = option(1, "server instances sharing this host; torch threads = CPUs / instances", low=1)
    torch_threads: int = option(0, "torch CPU threads (0: derived from CPU count and NUM_GPU_INSTANCES)", low=0)
    warmup: bool = option(True, "run one small generation before reporting ready")

    # GPU fast paths (README, "GPU fast paths")
    fp8: bool = option(
        False, "FP8 weights and activations on the transformer's linear layers (torchao); compute capability >= 8.9"
    )
    compile: bool = option(False, "torch.compile the transformer, with fused QKV projections (slow first start)")
    compile_mode: str = option(
        "default",
        "torch.compile mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    compile_scope: str = option(
        "blocks",
        "what torch.compile compiles: blocks (each repeated transformer block once, reused: minutes faster to "
        "start) or model (the whole transformer as one graph)",
        choices=("blocks", "model"),
    )
    compile_cache_dir: Path = option(
        Path(""),
        "with COMPILE: a folder (a volume that outlives the pod) where torch.compile's artefacts are kept, so a "
        "restart loads them instead of compiling again",
    )
    attention: str = option(
        "auto",
        "attention kernel: auto (FlashAttention 3 on Hopper where installed, else PyTorch SDPA) or a diffusers "
        "backend name (native, _flash_3, flash, sage, ...)",
    )
    cache_threshold: float = option(
        0.0,
        "first-block cache: reuse the remaining blocks' output while the first block changes less (0.12; 0: off)",
        low=0,
    )
    cpu_offload: bool = option(
        False, "keep the weights in CPU memory and move each model to the GPU to run (small GPUs)"
    )

    # SGLang engine (ENGINE=sglang)
    sglang_bin: str = option(
        "", "the sglang executable, in its own venv (default: CACHE_DIR/sglang-0.5.23/bin/sglang, else PATH)"
    )
    sglang_args: str = option("", "extra `sglang serve` flags, shell-quoted; they override the server's own")
    sglang_port: int = option(0, "loopback port of the SGLang child (0: a free one); SGLang also binds port+1", low=0)
    sglang_model_id: str = option("", "model family / SGLang --model-id, e.g. FLUX.1-dev (default: from the folder)")
    sglang_start_timeout: float = option(
        900.0, "seconds SGLang may take to become healthy (model load and warm-up)", low=1
    )

    # HTTP
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on", low=0, high=65535)
    api_key: str = option("", "comma-separated API keys; when set, /v1/* needs 'Authorization: Bearer <key>'")
    public_url: str = option("", "external base URL used in image URLs (default: from the request and X-Forwarded-*)")
    max_body_mb: float = option(
        64.0, "largest request body accepted, in MiB (larger: 413 before reading it all)", low=0.01
    )
    max_image_mb: float = option(50.0, "largest input image file, in MiB", low=0.01)
    input_memory_mb: float = option(
        0.0, "memory for edits' decoded input pixels held at once, in MiB (inputs are decoded to at most MAX_PIXELS); "
        "reserved before they are decoded, past it 429; at least what the largest edit holds, 4 bytes x MAX_PIXELS "
        "(0: room for four of those in each tenant's share: 64 with the defaults, 128 with several tenants)",
        low=0,
    )  # fmt: skip
    input_disk_mb: float = option(
        0.0, "disk for callers' bytes held at once in SPOOL_DIR (bodies over 64 KiB, their data URLs and files, "
        "fetched input images), in MiB; reserved before they are written, past it 429; at least what the largest "
        "request holds, 2 x (MAX_BODY_MB + MAX_IMAGE_MB) (0: room for that in each tenant's share: 228 with the "
        "defaults, 456 with several tenants)",
        low=0,
    )  # fmt: skip
    spool_dir: str = option(
        "", "folder in which the server makes its own folder (removed at exit; those of servers that are gone, at "
        "start) where bodies over 64 KiB and input images wait, one folder per request, removed when it ends "
        "(default: the system's temporary folder)"
    )  # fmt: skip
    max_input_pixels: int = option(
        50_000_000, "most pixels of all input images of one edit together, read from their headers before decoding",
        low=1,
    )  # fmt: skip
    remote_image_hosts: str = option(
        "",
        "comma-separated hosts that edits may fetch http(s) image URLs from: host (the scheme's default port), "
        "host:port, host:* (any port), *.domain, [IPv6]",
        check=hosts_problem,
    )
    keep_alive: float = option(
        75.0, "seconds an idle connection stays open (longer than nginx's and most balancers' idle timeouts)", low=1
    )
    header_timeout: float = option(
        30.0, "seconds a client has to send a request's headers; slower connections are closed", low=1
    )
    body_timeout: float = option(
        120.0, "seconds a client has to send a request's whole body once its headers are in; slower ones are dropped",
        low=0.1,
    )  # fmt: skip
    write_timeout: float = option(
        30.0, "seconds a client may read nothing of an answer waiting for it before the connection is dropped",
        low=0.1,
    )  # fmt: skip
    max_requests_per_connection: int = option(
        100, "requests one kept-alive connection may make before it is closed, so clients spread over pods", low=1
    )
    log_json: bool = option(False, "log one JSON object per line")
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))

    # Requests
    default_size: str = option("1024x1024", "size used for size=auto or when none is given", check=size_problem)
    min_pixels: int = option(64 * 64, "smallest width*height accepted", low=256)
    max_pixels: int = option(2048 * 2048, "largest width*height accepted", low=256)
    max_side: int = option(4096, "longest side accepted, in pixels", low=16)
    max_output_pixels: int = option(
        4096 * 4096, "largest width*height of an image the server returns, after upscaling", low=256
    )
    default_steps: int = option(0, "inference steps when a request gives none (0: from the model)", low=0)
    max_steps: int = option(100, "most inference steps a request may ask for", low=1)
    quality_steps: str = option(
        "",
        "steps for quality=low,medium,high, e.g. 'low:12,medium:20,high:28' (default: half, three quarters and "
        "all of the model's default steps; auto is high)",
        check=quality_steps_problem,
    )
    default_guidance: float = option(-1.0, "guidance scale when a request gives none (negative: from the model)")
    jpeg_quality: int = option(65, "JPEG/WebP quality when output_compression is not given", low=0, high=100)
    image_ttl: int = option(3600, "seconds an image fetched by URL (response_format=url) is kept", low=1)
    image_dir: Path = option(Path(""), "where images served by URL are stored (default: CACHE_DIR/images)")
    image_dir_max_mb: float = option(
        1024.0, "disk the images served by URL may use, in MiB; the oldest are deleted first", low=1
    )
    video_dir: Path = option(
        Path(""), "where video jobs and their files are kept, a volume that outlives pods (default: CACHE_DIR/videos)"
    )
    video_ttl: int = option(86400, "seconds a finished video job and its files are kept", low=1)
    video_dir_max_mb: float = option(
        10240.0, "disk the video jobs may use, in MiB; the oldest finished are deleted first", low=1
    )
    video_timeout: float = option(
        3600.0, "seconds a video job may wait in the queue and run before it fails with a timeout", low=1
    )
    preview_decoder: str = option(
        "vae",
        "what decodes the partial images of a stream (partial_images): vae (the model's own), linear (a projection "
        "fitted to it: nearly free, blurry), or tiny:PATH (a tiny autoencoder for the model's latents, e.g. TAEF1)",
        check=lambda v: None if v in ("vae", "linear") or v.startswith("tiny:") else "vae, linear or tiny:PATH",
    )
    stream_keepalive: float = option(
        10.0, "seconds between SSE keep-alive comments while a streamed request waits", low=0.05
    )

    # Scheduler
    max_queue: int = option(100, "requests waiting at most; more are refused with 429", low=1)
    max_batch: int = option(4, "images per pipeline call at most", low=1)
    batch_window_ms: float = option(
        10.0, "how long a partial batch waits for companions while others are in flight", low=0
    )
    max_bypass: int = option(4, "times a request may be passed over for one that needs no pipeline change", low=0)
    request_timeout: float = option(
        600.0, "seconds a request may wait, run and be delivered before it ends with a timeout", low=0.1
    )
    drain_timeout: float = option(
        120.0, "seconds SIGTERM waits for queued and running work before refusing what is left", low=0
    )
    postprocess_workers: int = option(2, "threads for post-processing (plugins, encoding) beside the engine", low=1)
    decode_workers: int = option(
        2, "decode processes: large JSON and multipart bodies parsed, input images decoded, one at a time each", low=1
    )
    decode_timeout: float = option(
        15.0, "seconds one body or image may take in a decode process; past it the process is killed (400)", low=0.1
    )
    max_jpeg_scans: int = option(
        100, "most scans of an input JPEG (a progressive one has about 10; each costs a pass over every block)", low=1
    )

    # Tenants: fair shares of the queue and the engine (docs/SECURITY.md, "Fair shares")
    tenant_header: str = option(
        "",
        "a header, set by a trusted gateway, that names the caller: each name is a tenant (off: each API key is one; "
        "see docs/SECURITY.md before turning it on)",
        check=header_problem,
    )
    tenant_weights: str = option(
        "",
        "tenants' shares of the engine as NAME:WEIGHT pairs, e.g. 'key-3f2a9c1b0d4e:2,batch:0.5' (others weigh 1)",
        check=weights_problem,
    )
    tenant_queue_share: float = option(
        0.5, "the most of MAX_QUEUE and of INPUT_MEMORY_MB one tenant may hold, when requests can come from several",
        low=0.01, high=1,
    )  # fmt: skip

    # Plugins
    plugins: str = option("", "comma-separated plugins to enable, e.g. lora,nsfw,upload,upscale")
    admin_api_key: str = option("", "comma-separated keys allowed to manage LoRAs (POST/DELETE /v1/loras)")

    # Each enabled plugin's own settings, by plugin name (filled by `load`, not a flag).
    sections: Mapping[str, Any] = field(default_factory=dict, compare=False, metadata={"section": True})

    @property
    def api_keys(self) -> tuple[str, ...]:
        return split(self.api_key)

    @property
    def weights(self) -> dict[str, float]:
        return parse_weights(self.tenant_weights)

    @property
    def several_tenants(self) -> bool:
        """Whether requests can come from more than one tenant: several keys (admins' included; without API_KEY no
        key is checked, so none names a tenant), or a gateway naming the callers."""
        keys = set(self.api_keys + self.admin_keys) if self.api_keys else set()
        return bool(self.tenant_header) or len(keys) > 1

    @property
    def input_memory_bytes(self) -> int:
        """INPUT_MEMORY_MB, or (0) room for four of the largest edits in each tenant's share: one tenant holding its
        share never keeps another's largest edit out, and edits of usual sizes wait in the queue by the dozen."""
        return int((self.input_memory_mb or 4 * largest_input_mb(self) / self.tenant_share) * 2**20)

    @property
    def input_disk_bytes(self) -> int:
        """INPUT_DISK_MB, or (0) room for the largest request in each tenant's share."""
        return int((self.input_disk_mb or largest_spool_mb(self) / self.tenant_share) * 2**20)

    @property
    def tenant_share(self) -> float:
        """The most of the queue and of the input memory and disk one tenant may hold."""
        return self.tenant_queue_share if self.several_tenants else 1.0

    @property
    def default_dimensions(self) -> tuple[int, int]:
        """DEFAULT_SIZE as (width, height); it is checked when the settings load."""
        return parse_size(self.default_size)

    @property
    def remote_hosts(self) -> tuple[str, ...]:
        return split(self.remote_image_hosts)

    @property
    def plugin_names(self) -> tuple[str, ...]:
        return split(self.plugins)

    @property
    def admin_keys(self) -> tuple[str, ...]:
        return split(self.admin_api_key)

    @property
    def images_path(self) -> Path:
        return self.image_dir if str(self.image_dir) not in ("", ".") else self.cache_dir / "images"

    @property
    def videos_path(self) -> Path:
        return self.video_dir if str(self.video_dir) not in ("", ".") else self.cache_dir / "videos"

    def section(self, name: str) -> Any:
        return self.sections[name]


def split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


# -- fields, flags and values ---------------------------------------------------------------


def options(section: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(section) if not f.metadata.get("section")]


def env_name(f: dataclasses.Field) -> str:
    return f.metadata.get("env") or f.name.upper()


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def field_type(section: type, f: dataclasses.Field) -> type:
    kind = typing.get_type_hints(section)[f.name]
    if isinstance(kind, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_KINDS = {int: "an integer", float: "a number", bool: "true or false"}


def convert(kind: type, raw: str) -> Any:
    if kind is bool:
        if raw.strip().lower() not in _BOOLS:
            raise ValueError
        return _BOOLS[raw.strip().lower()]
    if kind is float:
        value = float(raw)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError
        return value
    return kind(raw.strip()) if kind is int else kind(raw)


def _accepts(kind: type, f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    what = _KINDS.get(kind, "a value")
    if meta.get("low") is not None and meta.get("high") is not None:
        return f"{what} from {meta['low']:g} to {meta['high']:g}"
    if meta.get("low") is not None:
        return f"{what} >= {meta['low']:g}"
    return what


def value_problem(kind: type, f: dataclasses.Field, value: Any) -> str | None:
    """Why `value` is not acceptable for `f`, or None."""
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        return _accepts(kind, f)
    if (meta.get("low") is not None and value < meta["low"]) or (meta.get("high") is not None and value > meta["high"]):
        return _accepts(kind, f)
    return meta["check"](value) if meta.get("check") else None


def add_arguments(parser: argparse.ArgumentParser, sections: Mapping[str, type]) -> None:
    """Every option of the server and of each installed plugin as a flag; values are read by `load`."""
    for title, section in {"server": Settings, **sections}.items():
        group = parser.add_argument_group(title if title == "server" else f"plugin {title}")
        for f in options(section):
            kind = field_type(section, f)
            if kind is bool:
                group.add_argument(
                    flag_name(f), dest=f.name, action=argparse.BooleanOptionalAction, help=_flag_help(kind, f)
                )
            else:
                group.add_argument(flag_name(f), dest=f.name, metavar=env_name(f), help=_flag_help(kind, f))


def _flag_help(kind: type, f: dataclasses.Field) -> str:
    """Its help, then what it accepts (every value of a choice), its variable and its default."""
    default = "none" if f.default in ("", Path("")) else f.default
    accepts = "" if kind in (bool, str, Path) and not f.metadata.get("choices") else f"{_accepts(kind, f)}; "
    return f"{f.metadata['help']} [{accepts}env {env_name(f)}; default {default!s}]"


def _values(section: type, flags: Mapping[str, Any], environ: Mapping[str, str], problems: list[str]) -> dict:
    values = {}
    for f in options(section):
        kind, env = field_type(section, f), env_name(f)
        flag = flags.get(f.name)
        raw, where = (flag, flag_name(f)) if flag is not None else (environ.get(env), env)
        if raw is None:
            continue
        try:
            value = raw if isinstance(raw, bool) else convert(kind, raw)
        except ValueError:
            problems.append(f"{where}={raw!r}: expected {_accepts(kind, f)}")
            continue
        if why := value_problem(kind, f, value):
            problems.append(f"{where}={raw!r}: expected {why}")
            continue
        values[f.name] = value
    return values


def largest_input_mb(s: Settings) -> float:
    """What the largest legal edit holds of INPUT_MEMORY_MB (server/budget.py): its image and mask decoded, each
    to at most MAX_PIXELS (server/images.py, `fitted`), 3 bytes a pixel of an RGB image and 1 of a mask."""
    return 4 * min(s.max_pixels, s.max_input_pixels) / 2**20


def largest_spool_mb(s: Settings) -> float:
    """What the largest legal request holds of INPUT_DISK_MB (server/spool.py), an upper bound: its body and what
    its parse writes (at most the body again), or the files it keeps (the edited image and its mask, at most a
    body's worth when sent in it) while one more image is fetched."""
    return 2 * (s.max_body_mb + s.max_image_mb)


def _cross_problems(s: Settings) -> list[str]:
    problems = []
    if s.min_pixels > s.max_pixels:
        problems.append(f"MIN_PIXELS={s.min_pixels} is above MAX_PIXELS={s.max_pixels}")
    width, height = s.default_dimensions
    if not s.min_pixels <= width * height <= s.max_pixels or max(width, height) > s.max_side:
        problems.append(
            f"DEFAULT_SIZE={s.default_size!r}: expected a size within MIN_PIXELS, MAX_PIXELS and MAX_SIDE "
            f"({s.min_pixels} to {s.max_pixels} pixels, sides up to {s.max_side})"
        )
    if 0 < s.input_memory_mb < largest_input_mb(s):
        problems.append(
            f"INPUT_MEMORY_MB={s.input_memory_mb:g} is below what the largest edit holds, {largest_input_mb(s):g} "
            "(4 bytes x MAX_PIXELS: an image and its mask)"
        )
    if 0 < s.input_disk_mb < largest_spool_mb(s):
        problems.append(
            f"INPUT_DISK_MB={s.input_disk_mb:g} is below what the largest request holds, {largest_spool_mb(s):g} "
            "(2 x (MAX_BODY_MB + MAX_IMAGE_MB))"
        )
    if s.max_output_pixels < s.max_pixels:
        problems.append(f"MAX_OUTPUT_PIXELS={s.max_output_pixels} is below MAX_PIXELS={s.max_pixels}")
    return problems


def load(
    sections: Mapping[str, type],
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings from flags (argparse's namespace as a dict), the environment and overrides (tests, benchmarks).

    `sections` maps each enabled plugin's name to its settings class. ConfigError lists every problem."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    values = _values(Settings, flags, environ, problems)
    parts = {name: _values(section, flags, environ, problems) for name, section in sections.items()}
    owners = {f.name: name for name, section in sections.items() for f in options(section)}
    for key, value in overrides.items():
        (parts[owners[key]] if key in owners else values)[key] = value
    if problems:
        raise ConfigError("\n".join(problems))
    built = {name: section(**parts[name]) for name, section in sections.items()}
    settings = Settings(**values, sections=built)
    problems = _cross_problems(settings)
    if problems:
        raise ConfigError("\n".join(problems))
    return settings


def plugin_sections() -> dict[str, type]:
    """Each installed plugin's settings class, by plugin name: the `image_server.settings` entry points."""
    return {ep.name: ep.load() for ep in entry_points(group=SETTINGS_GROUP)}


def from_env(**overrides: Any) -> Settings:
    """Settings from the environment alone, with every installed plugin's section (tests, benchmarks)."""
    return load(plugin_sections(), **overrides)
