"""stream=true through the real server and the official SDK: partial images as they form, then the completed
ones, per image and in order; edits the same; a client that leaves mid-stream frees the engine."""

import itertools
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench import harness
from tests.support.images import decode_b64, gradient, pixels, png_bytes
from tests.support.waiting import until

STEPS = {"num_inference_steps": 8}


@pytest.fixture(scope="module")
def streamer():
    from tests.support.server import ServerProcess

    srv = ServerProcess({"MAX_BATCH": "4", "BATCH_WINDOW_MS": "300", "STREAM_KEEPALIVE": "0.2"}).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("partial_images", [0, 1, 2, 3])
def test_partial_images_then_the_completed_one_per_image(streamer, partial_images):
    client = streamer.client(max_retries=0)
    events = client.images.generate(
        prompt="a fox", size="256x128", n=2, stream=True, partial_images=partial_images,
        output_format="png", extra_body={**STEPS, "seed": 5},
    )  # fmt: skip
    seen = list(events)
    for seed in (5, 6):
        mine = [e for e in seen if e.model_extra["seed"] == seed]
        types = [e.type for e in mine]
        assert types == ["image_generation.partial_image"] * partial_images + ["image_generation.completed"]
        assert [e.partial_image_index for e in mine[:-1]] == list(range(partial_images))
        decoded = [decode_b64(e.b64_json) for e in mine]
        assert all(image.size == (256, 128) and image.format == "PNG" for image in decoded)
        assert all(e.size == "256x128" and e.output_format == "png" for e in mine)
        frames = [pixels(image) for image in decoded]
        assert all((a != b).any() for a, b in itertools.pairwise(frames))  # each sharper than the last


def test_the_first_partial_image_arrives_while_the_image_is_still_being_generated(streamer):
    """Not a timing: the server's count of images made says the image was not made yet when its first partial
    image (after 7 of 28 steps) reached the client."""

    def made() -> float:
        return harness.scrape(streamer.url, "image_server_images_total")

    client = streamer.client(max_retries=0)
    before = made()
    events = iter(
        client.images.generate(
            prompt="slow", size="1024x1024", stream=True, partial_images=3, extra_body={"num_inference_steps": 28}
        )
    )
    first = next(events)
    assert first.type == "image_generation.partial_image"
    assert made() == before
    assert [e.type for e in events][-1] == "image_generation.completed"
    assert made() == before + 1


def test_batched_streams_each_get_their_own_events(streamer):
    client = streamer.client(max_retries=0)

    def stream(seed):
        return list(
            client.images.generate(
                prompt=f"{seed}", size="256x256", stream=True, partial_images=2, extra_body={**STEPS, "seed": seed}
            )
        )

    batches_before = streamer.metric("image_server_batch_size_count")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(stream, (10, 20, 30)))
    assert streamer.metric("image_server_batch_size_count") - batches_before < 3  # some shared a batch
    for seed, events in zip((10, 20, 30), results, strict=True):
        assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert {e.model_extra["seed"] for e in events} == {seed}


def test_edits_stream_partial_images_too(streamer):
    events = list(
        streamer.client(max_retries=0).images.edit(
            image=("in.png", png_bytes(gradient(128, 128)), "image/png"),
            prompt="snow",
            stream=True,
            partial_images=2,
            extra_body=STEPS,
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]


def test_curl_sees_events_as_they_happen_and_keep_alives_while_queued(streamer):
    body = {"prompt": "x", "size": "1024x1024", "stream": True, "partial_images": 1, "num_inference_steps": 28}
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, streamer.url + "/v1/images/generations", json={**body, "stream": False},
                           timeout=300)  # fmt: skip
        until(lambda: streamer.metric("image_server_in_flight") == 1)
        with httpx.stream("POST", streamer.url + "/v1/images/generations", json=body, timeout=300) as response:
            assert "content-length" not in response.headers
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = list(response.iter_lines())
        assert busy.result().status_code == 200
    assert ": keep-alive" in lines  # while the other request held the engine
    kinds = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"


def test_a_client_that_leaves_mid_stream_stops_its_batch(streamer):
    body = {"prompt": "gone", "size": "1024x1024", "stream": True, "partial_images": 3, "num_inference_steps": 100}
    with httpx.stream("POST", streamer.url + "/v1/images/generations", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("event: image_generation.partial_image"):
                break  # the first preview, after 25 of 100 steps: now leave
    until(lambda: "batch stopped after" in streamer.logs())
    stopped = re.search(r"batch stopped after (\d+) of 100 steps", streamer.logs())
    assert stopped and int(stopped[1]) < 100
    assert streamer.client(max_retries=0).images.generate(prompt="next", size="64x64", extra_body=STEPS).data
