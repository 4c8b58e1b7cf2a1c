"""The built-in plugins' settings (flags and variables), registered under each plugin's name in the
`image_server.settings` entry-point group. One light module (no torch, no pydantic, and not inside the plugins'
packages, whose `__init__` imports them): `image-server serve --help` reads it without importing any plugin."""

from dataclasses import dataclass
from pathlib import Path

from server.config import MOST_LORAS, hosts_problem, option


@dataclass(frozen=True)
class LoRASettings:
    lora_dir: Path = option(Path("loras"), "folder of LoRA .safetensors files; a LoRA's name is its file name")
    lora_defaults: str = option("", "LoRA set used when a request names none, e.g. 'style:1.0,detail:0.7,grain:0.5'")
    max_loras: int = option(3, "most LoRAs one request may merge", low=1, high=MOST_LORAS)
    lora_max_mb: float = option(1024.0, "largest LoRA file accepted by POST /v1/loras, in MiB", low=0.01)
    lora_hotswap_rank: int = option(
        64, "with FP8 or COMPILE: rank of the hot-swapped LoRA slot (a set's ranks add up)", low=1
    )


# NSFW_CHECK's values and what each means
CHECK_MODES = {"always": "always", "true": "on", "on": "on", "yes": "on", "1": "on", "false": "off", "off": "off",
               "no": "off", "0": "off"}  # fmt: skip


def _check_problem(value: str) -> str | None:
    return None if value.lower() in CHECK_MODES else "true (check unless the request says no), false, or always"


@dataclass(frozen=True)
class NSFWSettings:
    nsfw_model_path: Path = option(Path(""), "local folder of the NSFW classifier (Falconsai/nsfw_image_detection)")
    nsfw_check: str = option(
        "true",
        "check images: true (unless the request says nsfw_check=false), false (only when it asks), always",
        check=_check_problem,
    )
    nsfw_threshold: float = option(0.5, "nsfw probability at or above which an image is flagged", low=0, high=1)
    nsfw_timeout: float = option(
        5.0, "seconds the NSFW check may take; past it the image is flagged (fail closed)", low=0.0001
    )
    nsfw_action: str = option("flag", "what to do with a flagged image", choices=("flag", "blur", "block"))


@dataclass(frozen=True)
class UploadSettings:
    upload_allowed_hosts: str = option(
        "",
        "hosts trusted for upload_urls (private addresses and plain http allowed): host (the scheme's default "
        "port), host:port, host:* (any port), *.domain, [IPv6]",
        check=hosts_problem,
    )
    upload_timeout: float = option(60.0, "seconds one upload attempt may take, from connecting to the answer", low=0.1)
    upload_retries: int = option(3, "retries of an upload after a connection error or a 5xx", low=0, high=10)


@dataclass(frozen=True)
class NunchakuSettings:
    nunchaku_transformer: str = option(
        "", "Nunchaku 4-bit FLUX transformer: an svdq-{int4|fp4}_r32-flux.1-*.safetensors file or a folder of both"
    )
    nunchaku_fallback: str = option(
        "none",
        "where Nunchaku cannot run (Hopper, B200, no GPU, no package): none (refuse to start), "
        "fp8 (FP8 + compile), bf16",
        choices=("none", "fp8", "bf16"),
    )
    nunchaku_fp16_attention: bool = option(
        False, "Nunchaku's FP16 attention (faster on RTX 30/40/50; always on Turing)"
    )
    nunchaku_t5: str = option("", "Nunchaku's 4-bit T5 text encoder file (awq-int4-flux.1-t5xxl.safetensors)")
