"""Edits: image-to-image, inpainting with an alpha mask, JSON data URLs, and their errors."""

import base64
import io

import httpx
import numpy as np
import openai
import pytest

from tests.support.images import assert_openai_shape, decode_b64, gradient, mask_png, pixels, png_bytes

FAST = {"num_inference_steps": 4, "seed": 11}


def test_edit_with_image_array(client):
    source = png_bytes(gradient(256, 256))
    result = client.images.edit(
        image=[("a.png", source, "image/png"), ("b.png", source, "image/png")],
        prompt="make it snow",
        size="256x256",
        n=2,
        output_format="png",
        extra_body=FAST,
    )
    assert len(result.data) == 2
    assert all(decode_b64(d.b64_json).size == (256, 256) for d in result.data)


def test_edit_single_image_field_and_auto_size(server):
    source = png_bytes(gradient(320, 192))
    response = httpx.post(
        server.url + "/v1/images/edits",
        files={"image": ("in.png", source, "image/png")},
        data={"prompt": "watercolor", "num_inference_steps": "4", "seed": "5"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "320x192"
    assert decode_b64(body["data"][0]["b64_json"]).size == (320, 192)


def test_strength_controls_how_much_changes(client):
    source = gradient(256, 256)

    def edit(strength):
        result = client.images.edit(
            image=("in.png", png_bytes(source), "image/png"),
            prompt="noise",
            size="256x256",
            output_format="png",
            extra_body={"num_inference_steps": 10, "seed": 1, "strength": strength},
        )
        return np.abs(pixels(decode_b64(result.data[0].b64_json)) - pixels(source)).mean()

    assert edit(0.2) < edit(1.0)


def test_inpainting_repaints_only_inside_the_mask(client):
    """Same seed, two prompts: far from the transparent hole the pixels stay (the VAE's group norms let a
    change anywhere move them by a level or two), inside the hole they change."""
    source = png_bytes(gradient(256, 256))
    mask = mask_png(hole=(96, 96, 160, 160))

    def inpaint(prompt):
        result = client.images.edit(
            image=("in.png", source, "image/png"),
            mask=("mask.png", mask, "image/png"),
            prompt=prompt,
            size="256x256",
            output_format="png",
            extra_body={"num_inference_steps": 4, "seed": 1, "strength": 1.0},
        )
        return pixels(decode_b64(result.data[0].b64_json))

    diff = np.abs(inpaint("a cat") - inpaint("a dog on a red table"))
    outside = np.concatenate([diff[:48].ravel(), diff[208:].ravel(), diff[:, :48].ravel(), diff[:, 208:].ravel()])
    inside = diff[96:160, 96:160]
    assert outside.max() <= 2
    assert inside.mean() > 10 * outside.mean()


def test_json_edit_with_data_url(server):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(gradient(256, 256))).decode()
    response = httpx.post(
        server.url + "/v1/images/edits",
        json={"prompt": "sunset", "images": [{"image_url": data_url}], "size": "256x256", **FAST},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert decode_b64(response.json()["data"][0]["b64_json"]).size == (256, 256)


def test_json_edit_with_mask_data_url(server):
    image = "data:image/png;base64," + base64.b64encode(png_bytes(gradient(256, 256))).decode()
    mask = "data:image/png;base64," + base64.b64encode(mask_png()).decode()
    response = httpx.post(
        server.url + "/v1/images/edits",
        json={"prompt": "p", "images": [{"image_url": image}], "mask": {"image_url": mask}, "size": "256x256", **FAST},
        timeout=60,
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("images", "param", "code"),
    [
        ([{"image_url": "https://example.com/cat.png"}], "images[0].image_url", "remote_image_not_allowed"),
        ([{"image_url": "data:image/png;base64,%%%"}], "images[0].image_url", "invalid_value"),
        ([{"image_url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}], "images[0]", None),
        ([{"file_id": "file-123"}], "images[0]", None),
        ([], "images", None),
    ],
)
def test_json_edit_errors(server, images, param, code):
    response = httpx.post(server.url + "/v1/images/edits", json={"prompt": "p", "images": images}, timeout=30)
    assert response.status_code == 400
    error = assert_openai_shape(response.json())
    assert error["param"] == param
    if code:
        assert error["code"] == code


def test_multipart_errors(client, server):
    source = png_bytes(gradient(256, 256))
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("x.png", b"garbage", "image/png"), prompt="p")
    assert err.value.body["param"] == "image"
    with pytest.raises(openai.BadRequestError) as err:  # a mask without alpha
        client.images.edit(image=("x.png", source, "image/png"), mask=("m.png", source, "image/png"), prompt="p")
    assert err.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as err:  # a mask of another size
        client.images.edit(
            image=("x.png", source, "image/png"),
            mask=("m.png", mask_png((128, 128), (0, 0, 8, 8)), "image/png"),
            prompt="p",
        )
    assert err.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("x.png", source, "image/png"), prompt="p", extra_body={"strength": 1.5})
    assert err.value.body["param"] == "strength"
    response = httpx.post(server.url + "/v1/images/edits", data={"prompt": "p"}, files={"other": ("a", b"b")})
    assert response.status_code == 400
    assert assert_openai_shape(response.json())["param"] == "image"
    response = httpx.post(server.url + "/v1/images/edits", content=b"prompt=p", headers={"content-type": "text/plain"})
    assert response.status_code == 400
    assert_openai_shape(response.json())


def test_too_many_images(server):
    source = png_bytes(gradient(64, 64))
    files = [("image[]", (f"{i}.png", source, "image/png")) for i in range(17)]
    response = httpx.post(server.url + "/v1/images/edits", data={"prompt": "p"}, files=files, timeout=30)
    assert response.status_code == 400
    assert_openai_shape(response.json())


def test_jpeg_and_webp_inputs(client):
    for fmt in ("JPEG", "WEBP"):
        buf = io.BytesIO()
        gradient(256, 256).save(buf, fmt)
        result = client.images.edit(
            image=(f"in.{fmt.lower()}", buf.getvalue(), f"image/{fmt.lower()}"), prompt="p", extra_body=FAST
        )
        assert decode_b64(result.data[0].b64_json).size == (256, 256)


def test_remote_image_url_from_an_allowed_host(make_server, tmp_path):
    """A loopback HTTP server stands for the operator's image store; only hosts in REMOTE_IMAGE_HOSTS are fetched."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    gradient(192, 128).save(tmp_path / "source.png")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        srv = make_server({"REMOTE_IMAGE_HOSTS": f"127.0.0.1:{files.server_address[1]}"})
        url = f"http://127.0.0.1:{files.server_address[1]}/source.png"
        response = httpx.post(
            srv.url + "/v1/images/edits", json={"prompt": "p", "images": [{"image_url": url}], **FAST}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert response.json()["size"] == "192x128"
        missing = httpx.post(
            srv.url + "/v1/images/edits",
            json={"prompt": "p", "images": [{"image_url": url.replace("source", "nope")}]},
            timeout=60,
        )
        assert missing.status_code == 400
        assert assert_openai_shape(missing.json())["param"] == "images[0].image_url"
    finally:
        files.shutdown()
