"""server/families.py: each family is found from its folder, its video rules, and the table agrees with the
diffusers pipelines it names (an argument the table says a family takes is one its pipeline takes)."""

import inspect
import json
from pathlib import Path

import diffusers
import pytest

from server.config import from_env
from server.families import (
    CFG,
    DEFAULT_TRUE_CFG,
    FAMILIES,
    GENERIC,
    TRUE_CFG,
    Video,
    detect_family,
    family_named,
    true_cfg_weight,
)
from server.service import check_family_settings


def model_folder(root: Path, family) -> Path:
    """A folder as a checkpoint of `family` looks: its model_index.json, its name, its transformer config."""
    name = family.needs_name or (family.name_contains[0] if family.name_contains else "model")
    folder = root / f"{family.name}-{name}"
    (folder / "transformer").mkdir(parents=True)
    index = {"_class_name": family.pipelines[0], **family.config}
    (folder / "model_index.json").write_text(json.dumps(index))
    if family.guidance_embeds is not None:
        (folder / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": family.guidance_embeds}))
    return folder


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_is_found_from_its_folder_and_no_row_hides_another(family, tmp_path):
    assert detect_family(model_folder(tmp_path, family)) is family


def test_an_unknown_pipeline_or_folder_is_generic(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert detect_family(tmp_path) is GENERIC
    assert detect_family(tmp_path / "missing") is GENERIC


def test_wan_ti2v_is_told_from_wan_t2v_by_its_model_index(tmp_path):
    """Wan 2.2's 5B TI2V and A14B T2V are both WanPipeline: the TI2V's per-token timesteps tell them apart."""
    ti2v, t2v = tmp_path / "a", tmp_path / "b"
    for folder, expand in ((ti2v, True), (t2v, False)):
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": expand}))
    assert detect_family(ti2v).name == "Wan2.2-TI2V" and detect_family(ti2v).size_multiple == 32
    assert detect_family(t2v).name == "Wan2.2-T2V" and detect_family(t2v).size_multiple == 16


def test_an_sglang_model_id_names_a_family():
    assert detect_family(Path("/nowhere"), "Qwen-Image").name == "Qwen-Image"
    named = detect_family(Path("/nowhere"), "Some-New-Model")
    assert named.sglang_model_id == "Some-New-Model" and named not in FAMILIES


WAN = Video(fps=24, frame_step=4, default_frames=121, max_frames=121, default_size=(1280, 704))


@pytest.mark.parametrize(("frames", "words"), [(8, "4k+1"), (0, "4k+1"), (125, "at most 121")])
def test_frame_counts_the_model_cannot_make_are_named(frames, words):
    assert words in WAN.frames_problem(frames)


def pipeline_arguments(class_name: str) -> set[str]:
    return set(inspect.signature(getattr(diffusers, class_name).__call__).parameters)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_table_agrees_with_the_pipelines_it_names(family):
    for class_name in family.pipelines + ((family.edit_pipeline,) if family.edit_pipeline else ()):
        arguments = pipeline_arguments(class_name)
        assert not family.negative or "negative_prompt" in arguments, class_name
        assert family.negative != TRUE_CFG or "true_cfg_scale" in arguments, class_name
        assert family.guidance_mode != CFG or family.cfg_argument in arguments, class_name
        assert (family.video is not None) == ("num_frames" in arguments), class_name
        assert not family.edits or family.text2img or "image" in arguments, class_name


def test_settings_every_request_of_the_family_would_break_on_stop_the_server():
    glm, schnell = family_named("GLM-Image"), family_named("FLUX.1-schnell")
    check_family_settings(glm, from_env(default_size="1024x1024"))
    with pytest.raises(SystemExit, match=r"DEFAULT_SIZE=1040x1040: GLM-Image needs .* multiples of 32"):
        check_family_settings(glm, from_env(default_size="1040x1040"))
    with pytest.raises(SystemExit, match=r"DEFAULT_GUIDANCE=3\.5: FLUX\.1-schnell takes no guidance"):
        check_family_settings(schnell, from_env(default_guidance=3.5))


def test_true_cfg_runs_at_the_requests_weight_else_the_default_with_a_negative_prompt_else_not_at_all():
    """The one rule both engines follow (the diffusers engine's pipeline arguments, SGLang's fields)."""
    assert true_cfg_weight(2.5, None) == 2.5
    assert true_cfg_weight(2.5, "blurry") == 2.5
    assert true_cfg_weight(None, "blurry") == DEFAULT_TRUE_CFG
    assert true_cfg_weight(None, None) is None
