"""server/rules.py: sizes, quality presets, seeds and output limits, as pure functions."""

import pytest

from server import rules
from server.config import from_env
from server.errors import APIError
from server.families import FAMILIES
from server.rules import check_output, fit, preset_steps, quality_preset, requested_size, seeds, steps

S = from_env()


def refused(fn, *args) -> APIError:
    with pytest.raises(APIError) as err:
        fn(*args)
    assert err.value.status == 400
    return err.value


def test_explicit_sizes_are_checked_against_every_limit():
    assert requested_size("512x256", None, S) == (512, 256)
    for size in ("1000x1000", "banana", "16x16", "4096x4096", "8192x16", "0x0"):
        assert refused(requested_size, size, None, S).param == "size"


def test_auto_takes_the_default_or_the_input_image_fitted():
    assert requested_size("auto", None, S) == (1024, 1024)
    assert requested_size(None, (320, 192), S) == (320, 192)
    assert requested_size("auto", (6000, 4000), S) == (2496, 1664)  # scaled into MAX_PIXELS, multiples of 16


def test_a_family_s_size_multiple_holds_for_explicit_and_auto_sizes():
    """GLM-Image and Wan 2.2 TI2V take multiples of 32: 80x80 is refused, `auto` fits an image to 32."""
    assert "multiples of 32" in refused(requested_size, "80x80", None, S, 32).message
    assert requested_size("96x64", None, S, 32) == (96, 64)
    assert requested_size("auto", (700, 500), S, 32) == (672, 480)


@pytest.mark.parametrize("image", [(1, 20_000_000), (20_000_000, 1), (4096 * 64, 16)])
def test_auto_refuses_an_input_too_thin_for_any_allowed_size(image):
    assert "give 'size' explicitly" in refused(fit, *image, S).message


@pytest.mark.parametrize("image", [(100, 7000), (16, 16), (4096, 1024), (64, 64)])
def test_auto_sizes_are_always_allowed_sizes(image):
    width, height = fit(*image, S)
    assert width % 16 == 0 and height % 16 == 0
    assert S.min_pixels <= width * height <= S.max_pixels and max(width, height) <= S.max_side


def test_quality_presets_and_dall_e_names():
    assert [quality_preset(q) for q in (None, "auto", "standard", "hd", "low")] == [
        "high", "high", "medium", "high", "low",
    ]  # fmt: skip
    assert [preset_steps(p, 28, {}) for p in ("low", "medium", "high")] == [14, 21, 28]
    assert [preset_steps(p, 4, {}) for p in ("low", "medium", "high")] == [2, 3, 4]
    assert preset_steps("low", 28, {"low": 9}) == 9
    assert steps(5, "low", 28, {}, 100) == 5  # explicit steps win
    assert refused(steps, 101, "high", 28, {}, 100).param == "num_inference_steps"


def test_output_limits_are_checked_before_generation():
    check_output(4096, 4096, "png", S)
    assert refused(check_output, 8192, 8192, "png", S).param == "size"  # upscale 4 on 2048x2048
    wide = from_env(max_output_pixels=20000 * 1024)
    assert refused(check_output, 16384, 1024, "webp", wide).param == "output_format"  # WebP's 14-bit sides
    check_output(16384, 1024, "jpeg", wide)


def test_seeds():
    assert seeds(7, 3) == [7, 8, 9]
    assert seeds([5, 5], 2) == [5, 5]
    assert seeds(2**63 - 1, 2) == [2**63 - 1, 0]
    assert len(set(seeds(None, 4))) >= 1
    assert refused(seeds, [1, 2], 3).param == "seed"


def family_named(name: str):
    return next(family for family in FAMILIES if family.name == name)


WAN_A14B = family_named("Wan2.2-T2V").video
WAN_TI2V_FAMILY = family_named("Wan2.2-TI2V")
WAN_TI2V = WAN_TI2V_FAMILY.video


@pytest.mark.parametrize(
    ("seconds", "rules_", "frames"),
    [
        (None, WAN_A14B, 81),
        ("5", WAN_A14B, 81),
        ("0.25", WAN_A14B, 5),
        ("1", WAN_TI2V, 25),
        ("5", WAN_TI2V, 121),
        ("0.167", WAN_TI2V, 5),  # 1/6 s has no exact decimal: a tenth of a frame off counts
        ("0.1667", WAN_TI2V, 5),
    ],
)
def test_seconds_map_to_1_plus_4k_frames(seconds, rules_, frames):
    assert rules.video_frames(seconds, rules_) == frames


@pytest.mark.parametrize("seconds", ["0", "0.3", "0.2", "0.16", "5.25", "6", "1/2", "1e1", " 1", "1.", "٣", "99999"])
def test_seconds_that_do_not_fit_are_a_400_naming_seconds(seconds):
    assert refused(rules.video_frames, seconds, WAN_A14B).param == "seconds"


def test_a_video_size_keeps_the_family_multiple():
    assert rules.video_size(None, WAN_TI2V_FAMILY, S) == (1280, 704)
    assert rules.video_size("640x352", WAN_TI2V_FAMILY, S) == (640, 352)
    error = refused(rules.video_size, "640x368", WAN_TI2V_FAMILY, S)  # 368 is a multiple of 16, not of 32
    assert error.param == "size" and "multiples of 32" in error.message
