"""Generations through the official openai package and the real server."""

import httpx
import pytest

from tests.support.images import assert_other_image, assert_same_image, decode_b64, pixels

FAST = {"num_inference_steps": 4}


def test_one_image_defaults_to_jpeg_b64(client):
    result = client.images.generate(model="gpt-image-1", prompt="a red fox", size="256x256", extra_body=FAST)
    assert len(result.data) == 1
    assert result.output_format == "jpeg"
    assert result.size == "256x256"
    image = decode_b64(result.data[0].b64_json)
    assert image.format == "JPEG" and image.size == (256, 256)
    assert isinstance(result.data[0].model_extra["seed"], int)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_output_formats(client, fmt):
    result = client.images.generate(
        prompt="a lake", size="256x128", n=2, output_format=fmt, extra_body={**FAST, "seed": 3}
    )
    assert result.output_format == fmt
    assert [d.model_extra["seed"] for d in result.data] == [3, 4]
    for item in result.data:
        image = decode_b64(item.b64_json)
        assert image.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
        assert image.size == (256, 128)
        assert "exif" not in image.info


def test_jpeg_quality_follows_output_compression(client):
    sizes = {}
    for quality in (10, 95):
        result = client.images.generate(
            prompt="q", size="256x256", output_compression=quality, extra_body={**FAST, "seed": 1}
        )
        sizes[quality] = len(result.data[0].b64_json)
    assert sizes[10] < sizes[95]


def test_url_response_format_serves_the_image(client, server):
    result = client.images.generate(prompt="a tree", size="256x256", response_format="url", n=2, extra_body=FAST)
    for item in result.data:
        assert item.b64_json is None
        assert item.url.startswith(server.url + "/v1/images/")
        response = httpx.get(item.url)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"


def test_url_honours_forwarded_headers(server):
    response = httpx.post(
        server.url + "/v1/images/generations",
        json={"prompt": "x", "size": "256x256", "response_format": "url", **FAST},
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example.com"},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.json()["data"][0]["url"].startswith("https://images.example.com/v1/images/")


def test_seed_reproduces_and_differs(client):
    def generate(seed):
        result = client.images.generate(
            prompt="a cat", size="256x256", output_format="png", extra_body={**FAST, "seed": seed}
        )
        return pixels(decode_b64(result.data[0].b64_json))

    first, again, other = generate(42), generate(42), generate(43)
    assert (first == again).all()
    assert (first != other).any()


def test_seed_list_gives_one_seed_per_image(client):
    """Images 0 and 2 share a seed but not a batch position: equal up to rounding, unlike image 1."""
    result = client.images.generate(
        prompt="p", size="256x256", n=3, output_format="png", extra_body={**FAST, "seed": [7, 100, 7]}
    )
    assert [d.model_extra["seed"] for d in result.data] == [7, 100, 7]
    a, b, c = (pixels(decode_b64(d.b64_json)) for d in result.data)
    assert_same_image(a, c)
    assert_other_image(a, b)


def test_auto_size_and_unknown_fields(client):
    result = client.images.generate(
        prompt="x", size="auto", extra_body={**FAST, "brand_new_openai_field": {"x": 1}}, quality="low"
    )
    assert result.size == "1024x1024"
    assert result.quality == "low"
    assert decode_b64(result.data[0].b64_json).size == (1024, 1024)


def test_model_name_is_accepted_whatever_it_is(client):
    for model in ("dall-e-3", "gpt-image-1", "anything"):
        assert client.images.generate(model=model, prompt="x", size="256x256", extra_body=FAST).data


def test_models_list_names_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["flux-demo"]
    model = client.models.retrieve("flux-demo")
    assert model.model_extra["engine"]["pipeline"] == "FluxPipeline"


def test_n_above_max_batch_runs_in_chunks_with_the_same_images(client):
    """n=6 with MAX_BATCH=4: two pipeline calls; image i still equals a lone run with seed + i."""
    many = client.images.generate(
        prompt="c", size="128x128", n=6, output_format="png", extra_body={**FAST, "seed": 100}
    )
    assert [d.model_extra["seed"] for d in many.data] == list(range(100, 106))
    alone = client.images.generate(prompt="c", size="128x128", output_format="png", extra_body={**FAST, "seed": 105})
    assert_same_image(pixels(decode_b64(many.data[5].b64_json)), pixels(decode_b64(alone.data[0].b64_json)))


def test_stream_yields_partial_then_completed_events_per_image(client):
    events = list(
        client.images.generate(
            prompt="s", size="256x256", n=2, stream=True, partial_images=2, extra_body={**FAST, "seed": 8}
        )
    )
    for seed in (8, 9):
        mine = [e for e in events if e.model_extra["seed"] == seed]
        assert [e.type for e in mine] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert all(decode_b64(e.b64_json).size == (256, 256) and e.output_format == "jpeg" for e in events)


def test_stream_edit(client):
    from tests.support.images import gradient, png_bytes

    events = list(
        client.images.edit(
            image=("a.png", png_bytes(gradient(128, 128)), "image/png"), prompt="e", stream=True, extra_body=FAST
        )
    )
    assert [e.type for e in events] == ["image_edit.completed"]
