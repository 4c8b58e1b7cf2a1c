"""The request rules, as pure functions: sizes, steps and quality, seeds, output limits.

Everything here runs before a request is queued, so that every limit is checked before any generation.
"""

import re
import secrets
from dataclasses import dataclass
from fractions import Fraction

from server.config import Settings, parse_size
from server.errors import bad_request
from server.families import Family, Video
from server.protocol import MAX_SEED

_RANDOM_SEED_LIMIT = 2**31  # random seeds stay small enough for every tool to reproduce them

# The encoders' largest side: WebP's format holds 14 bits, JPEG's 16 (PNG's 31 never binds here).
ENCODER_MAX_SIDE = {"webp": 16383, "jpeg": 65535, "png": 2**31 - 1}
# dall-e's names for the step presets
QUALITY_ALIASES = {"standard": "medium", "hd": "high", "auto": "high"}
QUALITY_FRACTIONS = {"low": 0.5, "medium": 0.75, "high": 1.0}  # of the model's default steps


@dataclass(frozen=True)
class Output:
    """How the images of one request are returned."""

    format: str
    compression: int
    response_format: str  # "b64_json" or "url"
    base_url: str
    quality: str  # the preset used: low, medium or high


def quality_preset(quality: str | None) -> str:
    quality = quality or "auto"
    return QUALITY_ALIASES.get(quality, quality)


def preset_steps(preset: str, model_steps: int, configured: dict[str, int]) -> int:
    """The steps of a quality preset: configured (QUALITY_STEPS), else a fraction of the model's default."""
    if preset in configured:
        return configured[preset]
    return max(1, round(model_steps * QUALITY_FRACTIONS[preset]))


def steps(requested: int | None, preset: str, model_steps: int, configured: dict[str, int], limit: int) -> int:
    """An explicit num_inference_steps wins over the quality preset."""
    chosen = requested or preset_steps(preset, model_steps, configured)
    if chosen > limit:
        raise bad_request(f"'num_inference_steps' may be at most {limit}.", "num_inference_steps")
    return chosen


def requested_size(
    size: str | None, image_size: tuple[int, int] | None, s: Settings, multiple: int = 16
) -> tuple[int, int]:
    """The size to generate, sides in the family's `multiple`: the request's, or for `auto` the input image's
    (fitted) or DEFAULT_SIZE (checked against the family when the model loads)."""
    if size in (None, "auto"):
        return fit(*image_size, s, multiple) if image_size is not None else s.default_dimensions
    return checked_size(size, multiple, s)


def checked_size(size: str, multiple: int, s: Settings) -> tuple[int, int]:
    """WIDTHxHEIGHT, sides multiples of `multiple`, within MIN_PIXELS, MAX_PIXELS and MAX_SIDE."""
    parsed = parse_size(size)
    if parsed is None:
        raise bad_request(f"Invalid value for 'size': {size!r}; use WIDTHxHEIGHT, e.g. 1024x1024, or auto.", "size")
    width, height = parsed
    if width % multiple or height % multiple:
        raise bad_request(
            f"Invalid value for 'size': {size}; width and height must be multiples of {multiple}.", "size"
        )
    if not size_allowed(width, height, s):
        raise bad_request(
            f"Invalid value for 'size': {size}; width*height must be between {s.min_pixels} and "
            f"{s.max_pixels} pixels and no side longer than {s.max_side}.",
            "size",
        )
    return width, height


def image_tokens(width: int, height: int) -> int:
    """An image's tokens for `usage`: one per 16x16-pixel patch (a VAE's 8x and the transformer's 2x2 patches)."""
    return (width // 16) * (height // 16)


def size_allowed(width: int, height: int, s: Settings) -> bool:
    return (
        s.min_pixels <= width * height <= s.max_pixels and min(width, height) >= 16 and max(width, height) <= s.max_side
    )


def fit(width: int, height: int, s: Settings, multiple: int = 16) -> tuple[int, int]:
    """An input image's size scaled into the allowed range, sides rounded down to `multiple` (the family's).

    An image too long and thin for any allowed size keeps no shape worth keeping: 400, asking for a size."""
    scale = min(1.0, (s.max_pixels / (width * height)) ** 0.5, s.max_side / max(width, height))
    scale = max(scale, (s.min_pixels / (width * height)) ** 0.5)
    fitted = tuple(max(multiple, int(side * scale) // multiple * multiple) for side in (width, height))
    if not size_allowed(*fitted, s):
        raise bad_request(
            f"size=auto cannot fit a {width}x{height} input image into the allowed sizes ({s.min_pixels} to "
            f"{s.max_pixels} pixels, sides from 16 to {s.max_side}); give 'size' explicitly.",
            "size",
        )
    return fitted


def check_output(width: int, height: int, fmt: str, s: Settings) -> None:
    """The images as they will be returned (after upscaling) must fit MAX_OUTPUT_PIXELS and the encoder."""
    if width * height > s.max_output_pixels:
        raise bad_request(
            f"The output would be {width}x{height} ({width * height} pixels), more than this server returns "
            f"(MAX_OUTPUT_PIXELS={s.max_output_pixels}); ask for a smaller size or upscale.",
            "size",
        )
    if max(width, height) > ENCODER_MAX_SIDE[fmt]:
        raise bad_request(
            f"{fmt.upper()} images cannot be wider or taller than {ENCODER_MAX_SIDE[fmt]} pixels; the output "
            f"would be {width}x{height}. Use another output_format or a smaller size.",
            "output_format",
        )


def seeds(seed: int | list[int] | None, n: int) -> list[int]:
    if seed is None:
        return [secrets.randbelow(_RANDOM_SEED_LIMIT) for _ in range(n)]
    if isinstance(seed, int):
        return [(seed + i) % (MAX_SEED + 1) for i in range(n)]
    if len(seed) != n:
        raise bad_request(
            f"'seed' lists {len(seed)} seeds for n={n} images; give one per image or a single seed.", "seed"
        )
    return list(seed)


def check_strength(strength: float | None, steps: int) -> None:
    if strength is not None and int(steps * strength) < 1:
        raise bad_request(
            f"'strength' {strength} with {steps} steps leaves no denoising step; raise either.", "strength"
        )


def check_background(background: str | None) -> None:
    if background == "transparent":
        raise bad_request(
            "Transparent backgrounds are not supported: this model cannot produce an alpha channel.",
            "background",
            "unsupported",
        )


# -- videos ---------------------------------------------------------------------------

_SECONDS = re.compile(r"[0-9]{1,4}(?:\.[0-9]{1,6})?")  # fullmatch: ASCII digits only


def video_size(size: str | None, family: Family, s: Settings) -> tuple[int, int]:
    """The request's WIDTHxHEIGHT in the family's multiples, or its video's default size."""
    return family.video.default_size if size is None else checked_size(size, family.size_multiple, s)


def video_frames(seconds: str | None, video: Video) -> int:
    """`seconds` at the family's frame rate, plus the first frame: it must come out as 1 + frame_step * k frames.
    A decimal within a tenth of a frame counts (at 24 fps, "0.167" is 4 frames past the first)."""
    if seconds is None:
        return video.default_frames
    step = Fraction(video.frame_step, video.fps)  # the finest duration this family can make
    longest = Fraction(video.max_frames - 1, video.fps)
    after_first = Fraction(seconds) * video.fps if _SECONDS.fullmatch(seconds) else Fraction(-1)
    frames = round(after_first)
    if frames <= 0 or abs(after_first - frames) > Fraction(1, 10) or frames % video.frame_step:
        raise bad_request(
            f"Invalid value for 'seconds': {seconds!r}; this model makes {video.fps} frames per second in steps of "
            f"{video.frame_step} frames, so 'seconds' must be a positive multiple of {seconds_text(step)}, "
            f"up to {seconds_text(longest)}.",
            "seconds",
        )
    if frames + 1 > video.max_frames:
        raise bad_request(
            f"Invalid value for 'seconds': {seconds!r}; this model makes at most {seconds_text(longest)} seconds "
            f"({video.max_frames} frames).",
            "seconds",
        )
    return frames + 1


def seconds_text(value: Fraction) -> str:
    """5 -> '5', 1/4 -> '0.25', 1/6 -> '0.167'."""
    return str(int(value)) if value.denominator == 1 else f"{float(value):.3g}"
