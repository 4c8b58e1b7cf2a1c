"""NSFW post-filter and upscale through the real server, with a real (small, random) ViT classifier."""

import numpy as np
import openai
import pytest

from plugins.nsfw.demo import write_demo_classifier
from tests.support.images import assert_openai_shape, decode_b64, pixels

FAST = {"num_inference_steps": 4, "seed": 21}


@pytest.fixture(scope="module")
def nsfw_model(tmp_path_factory):
    return write_demo_classifier(tmp_path_factory.mktemp("nsfw") / "nsfw_image_detection")


def nsfw_server(make_server, model, **env):
    return make_server({"PLUGINS": "nsfw,upscale", "NSFW_MODEL_PATH": str(model), **env})


def test_scores_every_image_and_flags_by_threshold(make_server, nsfw_model):
    srv = nsfw_server(make_server, nsfw_model, NSFW_THRESHOLD="0.0")  # every score is >= 0: all flagged
    result = srv.client(max_retries=0).images.generate(prompt="x", size="256x256", n=2, extra_body=FAST)
    for item in result.data:
        extra = item.model_extra
        assert extra["nsfw"] is True
        assert 0.0 < extra["nsfw_score"] < 1.0
        assert "nsfw_error" not in extra
        assert item.b64_json  # action "flag": the image is still returned


def test_below_threshold_is_not_flagged_and_the_check_can_be_skipped(make_server, nsfw_model):
    srv = nsfw_server(make_server, nsfw_model, NSFW_THRESHOLD="1")
    client = srv.client(max_retries=0)
    item = client.images.generate(prompt="x", size="256x256", extra_body=FAST).data[0].model_extra
    assert item["nsfw"] is False and item["nsfw_score"] < 1.01
    for field in ("nsfw_check", "enable_nsfw_check"):  # the legacy name works too
        item = client.images.generate(prompt="x", size="256x256", extra_body={**FAST, field: False}).data[0]
        assert "nsfw" not in item.model_extra


def test_timeout_fails_closed_and_the_request_succeeds(make_server, nsfw_model):
    srv = nsfw_server(make_server, nsfw_model, NSFW_TIMEOUT="0.0001", NSFW_THRESHOLD="1")
    result = srv.client(max_retries=0).images.generate(prompt="x", size="256x256", n=2, extra_body=FAST)
    for item in result.data:
        extra = item.model_extra
        assert extra["nsfw"] is True  # would be False with a score: the threshold is above 1
        assert extra["nsfw_score"] is None
        assert "timed out" in extra["nsfw_error"]
        assert item.b64_json


def test_block_withholds_images_and_all_blocked_is_moderation_blocked(make_server, nsfw_model):
    srv = nsfw_server(make_server, nsfw_model, NSFW_THRESHOLD="0.0", NSFW_ACTION="block")
    client = srv.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="256x256", n=2, extra_body=FAST)
    assert assert_openai_shape(err.value.response.json())["code"] == "moderation_blocked"
    result = client.images.generate(prompt="x", size="256x256", extra_body={**FAST, "nsfw_check": False})
    assert result.data[0].b64_json


def test_blur_returns_a_blurred_image(make_server, nsfw_model):
    def generate(action):
        srv = nsfw_server(make_server, nsfw_model, NSFW_THRESHOLD="0.0", NSFW_ACTION=action)
        item = (
            srv.client(max_retries=0)
            .images.generate(prompt="x", size="256x256", output_format="png", extra_body=FAST)
            .data[0]
        )
        srv.stop()
        return item

    flagged, blurred = generate("flag"), generate("blur")
    assert blurred.model_extra["nsfw_action"] == "blur"
    sharp, soft = pixels(decode_b64(flagged.b64_json)), pixels(decode_b64(blurred.b64_json))
    assert np.abs(np.diff(soft, axis=0)).mean() < np.abs(np.diff(sharp, axis=0)).mean() / 2


def test_upscale(make_server, nsfw_model):
    srv = nsfw_server(make_server, nsfw_model)
    client = srv.client(max_retries=0)
    for factor in (2, 4):
        result = client.images.generate(prompt="x", size="128x64", extra_body={**FAST, "upscale": factor})
        assert result.size == f"{128 * factor}x{64 * factor}"
        assert decode_b64(result.data[0].b64_json).size == (128 * factor, 64 * factor)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="128x64", extra_body={"upscale": 3})
    assert err.value.body["param"] == "upscale"


def test_missing_classifier_stops_startup(tmp_path):
    from tests.support.server import ServerProcess

    srv = ServerProcess({"PLUGINS": "nsfw", "NSFW_MODEL_PATH": str(tmp_path / "nope")})
    srv.start(wait=False)
    assert srv.proc.wait(60) == 1
    assert "NSFW_MODEL_PATH" in srv.logs()
