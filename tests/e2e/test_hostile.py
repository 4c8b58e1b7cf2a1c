"""Hostile input through the real server: each class of the hardening issue reproduced, and shown harmless.

Nothing a client sends may corrupt the model, starve other requests, exhaust memory, reach private networks,
or get a 500; a rejected request changes nothing.
"""

import base64
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.images import assert_openai_shape, bomb_png, decode_b64, pixels
from tests.support.loras import ODD_KINDS, half_broken_lora, odd_lora, peft_lora
from tests.support.s3 import Verifier, presigned_put
from tests.support.waiting import until

FAST = {"num_inference_steps": 2, "seed": 3}


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# -- 1. one bad LoRA must not corrupt the model for everyone ---------------------------------------


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    from tests.support.server import ServerProcess

    folder = tmp_path_factory.mktemp("loras")
    peft_lora(folder / "style.safetensors", seed=1)
    for broken in ("rank", "bias", "nan"):
        half_broken_lora(folder / f"half-{broken}.safetensors", broken)
    for kind in ODD_KINDS:
        odd_lora(folder / f"odd-{kind}.safetensors", kind)
    srv = ServerProcess({"PLUGINS": "lora", "LORA_DIR": str(folder), "MAX_LORAS": "3"}).start()
    yield srv
    srv.stop()


def image(client, loras) -> object:
    result = client.images.generate(
        prompt="a fox", size="64x64", output_format="png", extra_body={**FAST, "loras": loras}
    )
    return pixels(decode_b64(result.data[0].b64_json))


def test_a_lora_that_fails_half_way_leaves_every_later_image_as_it_was(lora_server):
    client = lora_server.client(max_retries=0)
    base, styled = image(client, []), image(client, [{"name": "style"}])
    names = [f"half-{b}" for b in ("rank", "bias", "nan")] + [f"odd-{k}" for k in ODD_KINDS]
    for name in names:
        with pytest.raises(openai.BadRequestError) as err:
            image(client, [{"name": "style"}, {"name": name}])
        assert err.value.body["code"] == "lora_invalid", name
        assert (image(client, []) == base).all(), name
        assert (image(client, [{"name": "style"}]) == styled).all(), name
    assert lora_server.metric("image_server_requests_total", 'status="500"') == 0


def test_the_management_api_refuses_what_would_fail_later_and_races_get_one_winner(make_server, tmp_path):
    folder = tmp_path / "loras"
    srv = make_server({"PLUGINS": "lora", "LORA_DIR": str(folder), "LORA_MAX_MB": "1"})
    url = srv.url + "/v1/loras"
    broken = half_broken_lora(tmp_path / "broken.safetensors", "rank")
    response = httpx.post(url, files={"file": ("broken.safetensors", broken.read_bytes())}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "lora_invalid"
    good = peft_lora(tmp_path / "good.safetensors", seed=1).read_bytes()
    response = httpx.post(url, files={"file": ("x.safetensors", good)}, data={"name": "style\n"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "name"

    def upload(_):
        return httpx.post(url, files={"file": ("x.safetensors", good)}, data={"name": "race"}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(upload, range(8)))
    assert sorted(r.status_code for r in answers) == [200] + [409] * 7
    conflict = next(r for r in answers if r.status_code == 409)
    assert assert_openai_shape(conflict.json())["type"] == "invalid_request_error"
    big = httpx.post(url, files={"file": ("big.safetensors", bytes(3 * 2**20))}, timeout=60)
    assert big.status_code == 413 and "1 MiB (LORA_MAX_MB)" in big.json()["error"]["message"]
    assert sorted(p.name for p in folder.iterdir()) == ["race.safetensors"]


# -- 2. decompression bombs cost nothing -------------------------------------------------------------


def test_decompression_bombs_are_refused_from_their_headers(server):
    before = peak_rss_kib(server.proc.pid)
    bomb = bomb_png(11_000, 11_000)  # 484 MB as RGBA each, a few hundred bytes as a file
    files = [("image[]", (f"{i}.png", bomb, "image/png")) for i in range(4)]
    response = httpx.post(server.url + "/v1/images/edits", files=files, data={"prompt": "p"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_too_large"
    url = "data:image/png;base64," + base64.b64encode(bomb).decode()
    body = {"prompt": "p", "images": [{"image_url": url}] * 4}
    response = httpx.post(server.url + "/v1/images/edits", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_too_large"
    assert peak_rss_kib(server.proc.pid) - before < 100_000  # KiB: nothing was decoded


def test_size_auto_from_a_needle_shaped_image_is_refused_before_generation(server):
    images_before = server.metric("image_server_images_total")
    files = {"image": ("needle.png", bomb_png(1, 20_000_000), "image/png")}
    response = httpx.post(
        server.url + "/v1/images/edits", files=files, data={"prompt": "p", "size": "auto"}, timeout=60
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "size"
    assert server.metric("image_server_images_total") == images_before


# -- 3. a slow upload target holds nothing but its own upload ---------------------------------------


def test_a_trickling_upload_target_stalls_no_one_and_its_image_comes_back(make_server):
    target = Verifier()
    target.thread.start()
    target.trickle = 1.0
    srv = make_server({"PLUGINS": "upload", "UPLOAD_ALLOWED_HOSTS": "127.0.0.1:*", "UPLOAD_TIMEOUT": "6",
                       "UPLOAD_RETRIES": "0", "POSTPROCESS_WORKERS": "1"})  # fmt: skip
    client = srv.client(max_retries=0, timeout=120)
    try:
        with ThreadPoolExecutor(2) as pool:
            slow = [
                pool.submit(
                    client.images.generate,
                    prompt="slow",
                    size="64x64",
                    extra_body={**FAST, "upload_urls": [presigned_put(target.url, f"slow/{i}.jpeg")]},
                )
                for i in range(2)
            ]
            until(lambda: target.trickling == 2)
            plain = client.images.generate(prompt="plain", size="64x64", extra_body=FAST)
            assert plain.data[0].b64_json and target.trickling == 2  # answered while both uploads still trickle
            for future in slow:
                item = future.result().data[0]
                assert item.b64_json  # the image is not lost
                assert item.model_extra["upload"]["status"] == "failed"
                assert "UPLOAD_TIMEOUT" in item.model_extra["upload"]["error"]
    finally:
        target.shutdown()


# -- 6. limits hold --------------------------------------------------------------------------------------


def test_upscaling_past_max_output_pixels_is_refused_before_generation(make_server):
    srv = make_server({"PLUGINS": "upscale", "MAX_PIXELS": str(1024 * 1024), "MAX_OUTPUT_PIXELS": str(1024 * 1024)})
    client = srv.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="1024x1024", extra_body={"upscale": 2})
    assert err.value.body["param"] == "size" and "MAX_OUTPUT_PIXELS" in err.value.body["message"]
    assert srv.metric("image_server_images_total") == 0
    assert client.images.generate(prompt="x", size="256x256", extra_body={**FAST, "upscale": 4}).size == "1024x1024"


def test_url_images_stay_within_their_disk_quota(make_server):
    srv = make_server({"IMAGE_DIR_MAX_MB": "1"})  # the demo's 512x512 PNGs are noise: about 0.75 MiB each
    client = srv.client(max_retries=0)
    urls = [
        client.images.generate(prompt=f"{i}", size="512x512", output_format="png", response_format="url",
                               extra_body=FAST).data[0].url
        for i in range(3)
    ]  # fmt: skip
    folder = Path(srv.env["IMAGE_DIR"])
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 2**20
    assert httpx.get(urls[0]).status_code == 404 and httpx.get(urls[-1]).status_code == 200


# -- 7. SSRF through IPv6 forms of private addresses --------------------------------------------------


@pytest.mark.parametrize(
    "host", ["[64:ff9b::a9fe:a9fe]", "[::7f00:1]", "[2002:a9fe:a9fe::]", "[::ffff:10.0.0.1]", "[64:ff9b:1::a00:1]"]
)
def test_ipv6_disguises_of_private_addresses_are_refused(make_server_once, host):
    with pytest.raises(openai.BadRequestError) as err:
        make_server_once.client(max_retries=0).images.generate(
            prompt="x", size="64x64", extra_body={"upload_urls": [f"https://{host}/bucket/key"]}
        )
    assert err.value.body["code"] == "unsafe_upload_url" and err.value.body["param"] == "upload_urls[0]"


@pytest.fixture(scope="module")
def make_server_once():
    from tests.support.server import ServerProcess

    srv = ServerProcess({"PLUGINS": "upload"}).start()
    yield srv
    srv.stop()


# -- 8. operators --------------------------------------------------------------------------------------


def test_nsfw_check_always_cannot_be_turned_off_by_the_client(make_server, tmp_path):
    from plugins.nsfw.demo import write_demo_classifier

    srv = make_server(
        {"PLUGINS": "nsfw", "NSFW_MODEL_PATH": str(write_demo_classifier(tmp_path / "nsfw")), "NSFW_CHECK": "always"}
    )
    item = (
        srv.client(max_retries=0)
        .images.generate(prompt="x", size="64x64", extra_body={**FAST, "nsfw_check": False})
        .data[0]
    )
    assert "nsfw" in item.model_extra and "nsfw_score" in item.model_extra


# -- 9. the smaller ones -------------------------------------------------------------------------------


def test_a_client_that_leaves_mid_body_is_a_499_not_an_error(make_server):
    server = make_server()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n" + b'{"prompt": "' + b"x" * 1000
        )
    until(lambda: "status=499" in server.logs())
    assert "Traceback" not in server.logs() and "ERROR" not in server.logs()


def test_a_429_leaves_nothing_unawaited_and_says_how_long_the_queue_is(make_server):
    srv = make_server({"MAX_QUEUE": "1", "MAX_BATCH": "1"})
    slow = {"prompt": "slow", "size": "1024x1024", "num_inference_steps": 28}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, srv.url + "/v1/images/generations", json=slow, timeout=300)
        until(lambda: srv.metric("image_server_in_flight") == 1 and srv.metric("image_server_queue_depth") == 0)
        queued = pool.submit(httpx.post, srv.url + "/v1/images/generations", json=slow, timeout=300)
        until(lambda: srv.metric("image_server_queue_depth") == 1)
        full = httpx.post(srv.url + "/v1/images/generations", json=slow, timeout=60)
        assert full.status_code == 429 and full.headers["connection"] == "close"
        assert 1 <= int(full.headers["retry-after"]) <= 120
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert "never awaited" not in srv.logs()


def test_drain_gives_up_on_the_running_batch_at_drain_timeout(make_server):
    srv = make_server({"MAX_BATCH": "1", "DRAIN_TIMEOUT": "1"})
    slow = {"prompt": "slow", "size": "2048x2048", "num_inference_steps": 100}  # minutes on this CPU
    with ThreadPoolExecutor(2) as pool:
        answers = [
            pool.submit(httpx.post, srv.url + "/v1/images/generations", json=slow, timeout=300) for _ in range(2)
        ]
        until(lambda: srv.metric("image_server_in_flight") == 2)
        srv.signal()
        statuses = [a.result().status_code for a in answers]
    assert statuses == [503, 503]
    assert srv.proc.wait(60) == 0
