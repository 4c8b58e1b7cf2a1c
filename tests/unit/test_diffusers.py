"""server/engines/diffusers.py with a video family: the real engine on the tiny Wan 2.2 TI2V (demo:wan2.2), in
this process. A video spec gives its frames; what the family cannot do is refused naming the field."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from server.config import Settings
from server.engines.base import NoHooks, Progress
from server.engines.diffusers import DiffusersEngine
from server.errors import APIError
from server.spec import GenerationSpec
from tests.support.server import CACHE_DIR


@pytest.fixture(scope="module")
def wan() -> DiffusersEngine:
    engine = DiffusersEngine(dataclasses.replace(Settings(), model="demo:wan2.2", cache_dir=CACHE_DIR))
    engine.load(NoHooks())
    return engine


def video(frames: int = 9, **fields) -> GenerationSpec:
    base = {"prompt": "a fox", "n": 1, "width": 64, "height": 64, "steps": 2, "guidance": 5.0, "seeds": [7]}
    return GenerationSpec(**{**base, **fields}, frames=frames)


def pixels(frames: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(frame, dtype=np.int16) for frame in frames])


def test_the_family_and_its_video_rules_are_read_from_the_engine(wan):
    assert wan.family.name == "Wan2.2-TI2V" and wan.name == "wan2.2-demo"
    assert wan.family.video.fps == 24 and wan.family.video.frame_step == 4
    assert wan.info["modes"] == ["img2img", "text2img"] and wan.defaults() == (50, 5.0)


def test_a_video_spec_gives_its_frames_and_a_seed_gives_the_same_video(wan):
    first, second = wan.run([video(seeds=[7]), video(seeds=[8])], Progress())
    assert len(first) == len(second) == 9 and {f.size for f in first + second} == {(64, 64)}
    again = wan.run([video(seeds=[7])], Progress())[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(second))


def test_each_denoising_step_is_reported(wan):
    done: list[tuple[int, int]] = []
    wan.run([video(5, steps=3)], Progress(step=lambda step, steps: done.append((step, steps))))
    assert done == [(1, 3), (2, 3), (3, 3)]


def test_image_to_video_starts_from_the_given_image(wan):
    red = Image.new("RGB", (80, 48), (220, 20, 20))
    frames = wan.run([video(5, mode="img2img", image=red)], Progress())[0]
    plain = wan.run([video(5)], Progress())[0]
    assert len(frames) == 5 and frames[0].size == (64, 64)
    assert not np.array_equal(pixels(frames), pixels(plain))


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        (video(0), "model"),  # an image from a video model
        (video(9, n=2, seeds=[1, 2]), "n"),
        (video(8), "seconds"),  # not 4k+1 frames
        (video(125), "seconds"),  # past the family's longest video
        (video(9, true_cfg=4.0), "true_cfg_scale"),
        (video(9, strength=0.5, mode="img2img", image=Image.new("RGB", (64, 64))), "strength"),
        (video(9, mode="inpaint", image=Image.new("RGB", (64, 64)), mask=Image.new("L", (64, 64))), "mask"),
        (video(9, partial_images=2), "partial_images"),
    ],
)
def test_what_the_family_cannot_do_is_refused_naming_the_field(wan, spec, param):
    with pytest.raises(APIError) as refused:
        wan.check(spec)
    assert refused.value.status == 400 and refused.value.param == param


def test_a_mode_whose_pipeline_cannot_hold_the_first_block_cache_is_a_400_not_a_500():
    """FLUX.1's img2img and inpaint pipelines call the transformer outside a cache context: with CACHE_THRESHOLD
    an edit failed at its first step with a 500. Now edits are refused before queueing, saying why; generations
    still run with the cache."""
    settings = dataclasses.replace(Settings(), model="demo", cache_dir=CACHE_DIR, cache_threshold=0.2)
    engine = DiffusersEngine(settings)
    engine.load(NoHooks())
    assert engine.info["modes"] == ["text2img"] and engine.info["cache"]
    spec = GenerationSpec(prompt="a fox", n=1, width=64, height=64, steps=2, guidance=3.5, seeds=[1])
    engine.check(spec)
    assert len(engine.run([spec], Progress())[0]) == 1
    edit = dataclasses.replace(spec, mode="img2img", image=Image.new("RGB", (64, 64)), strength=0.5)
    with pytest.raises(APIError) as refused:
        engine.check(edit)
    assert refused.value.status == 400 and refused.value.param == "image"
    assert "CACHE_THRESHOLD" in refused.value.message
