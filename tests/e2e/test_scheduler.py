"""The scheduler through the real server: batching, backpressure, timeouts, disconnects, drain, failures."""

import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.support.images import assert_same_image, decode_b64, pixels
from tests.support.waiting import submit_accepted, until

SLOW = {"prompt": "slow", "size": "1024x1024", "num_inference_steps": 28}


def post(srv, body, timeout=120.0):
    return httpx.post(srv.url + "/v1/images/generations", json=body, timeout=timeout)


def test_concurrent_clients_are_batched_and_match_unbatched_runs(make_server):
    srv = make_server({"MAX_BATCH": "4", "BATCH_WINDOW_MS": "200"})
    client = srv.client(max_retries=0)

    def generate(seed):
        result = client.images.generate(
            prompt=f"prompt {seed % 3}",
            size="256x256",
            output_format="png",
            extra_body={"seed": seed, "num_inference_steps": 4},
        )
        return pixels(decode_b64(result.data[0].b64_json))

    with ThreadPoolExecutor(20) as pool:
        batched = list(pool.map(generate, range(20)))
    batches = srv.metric("image_server_batch_size_count")
    images = srv.metric("image_server_batch_size_sum")
    assert images == 20
    assert batches < 20, "no request shared a pipeline call"

    batches_before = batches
    alone = [generate(seed) for seed in range(20)]  # one at a time: each is a batch of one
    assert srv.metric("image_server_batch_size_count") == batches_before + 20
    for a, b in zip(batched, alone, strict=True):
        assert_same_image(a, b)


def test_full_queue_answers_429_with_retry_after(make_server):
    srv = make_server({"MAX_QUEUE": "1", "MAX_BATCH": "1"})
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, srv, SLOW)
        until(
            lambda: srv.metric("image_server_in_flight") == 1 and srv.metric("image_server_queue_depth") == 0,
            what="first request running",
        )
        queued = pool.submit(post, srv, {**SLOW, "size": "256x256"})
        until(lambda: srv.metric("image_server_queue_depth") == 1, what="second request queued")
        with pytest.raises(openai.RateLimitError) as err:
            srv.client(max_retries=0).images.generate(prompt="one too many", size="256x256")
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.body["code"] == "queue_full"
        assert running.result().status_code == 200
        assert queued.result().status_code == 200


def test_timeout_ends_waiting_and_the_server_goes_on(make_server):
    srv = make_server({"MAX_BATCH": "1", "REQUEST_TIMEOUT": "1"})
    client = srv.client(max_retries=0)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, srv, SLOW)
        second = pool.submit(post, srv, SLOW)
        for response in (first.result(), second.result()):
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "timeout"
    until(lambda: srv.metric("image_server_in_flight") == 0, what="idle")
    with pytest.raises(openai.InternalServerError) as err:
        client.images.generate(prompt="slow", size="1024x1024", extra_body={"num_inference_steps": 28})
    assert err.value.status_code == 504
    assert client.images.generate(prompt="quick", size="64x64", extra_body={"num_inference_steps": 1}).data


def test_request_whose_client_left_before_it_started_is_dropped(make_server):
    srv = make_server({"MAX_BATCH": "1"})
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, srv, SLOW)
        until(lambda: srv.metric("image_server_in_flight") == 1, what="first request running")
        with pytest.raises(httpx.ReadTimeout):
            post(srv, {**SLOW, "prompt": "impatient"}, timeout=0.5)
        assert running.result().status_code == 200
    until(lambda: srv.metric("image_server_in_flight") == 0, what="idle")
    assert srv.metric("image_server_images_total") == 1  # the impatient request never ran
    assert "status=499" in srv.logs()


def test_sigterm_drains_queued_work_then_exits_zero(make_server):
    srv = make_server({"MAX_BATCH": "1", "DRAIN_TIMEOUT": "120"})
    # work enough that the drain outlasts the checks below: four 1024x1024 images at 28 steps, one at a time
    body = {**SLOW, "prompt": "queued"}
    with ThreadPoolExecutor(4) as pool:
        accepted = submit_accepted(pool, srv.url, lambda b: post(srv, b), [{**body, "seed": i} for i in range(4)])
        until(lambda: srv.metric("image_server_queue_depth") >= 2, what="a queue")
        srv.signal(signal.SIGTERM)
        until(lambda: httpx.get(srv.url + "/ready").status_code == 503, timeout=5, what="readiness 503")
        late = post(srv, body)
        assert late.status_code == 503
        assert late.headers["retry-after"]
        assert late.json()["error"]["code"] == "shutting_down"
        assert httpx.get(srv.url + "/health").status_code == 200
        assert [f.result().status_code for f in accepted] == [200] * 4
    assert srv.proc.wait(60) == 0


def test_engine_failure_is_a_500_and_spares_batch_neighbours(make_server):
    srv = make_server(
        {"MAX_BATCH": "4", "BATCH_WINDOW_MS": "300"},
        command=[sys.executable, "-m", "tests.support.faulty_server", "serve"],
    )
    client = srv.client(max_retries=0)
    results = {}

    def run(prompt):
        try:
            results[prompt] = client.images.generate(
                prompt=prompt, size="256x256", extra_body={"num_inference_steps": 2}
            )
        except openai.APIStatusError as exc:
            results[prompt] = exc

    threads = [threading.Thread(target=run, args=(p,)) for p in ("fine one", "EXPLODE", "fine two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["EXPLODE"], openai.InternalServerError)
    assert results["EXPLODE"].body["code"] == "engine_error"
    assert "/srv" not in results["EXPLODE"].body["message"]  # the exception's text went to the log alone
    assert results["fine one"].data and results["fine two"].data
    assert srv.metric("image_server_engine_errors_total") >= 1
    assert client.images.generate(prompt="after", size="256x256", extra_body={"num_inference_steps": 2}).data
