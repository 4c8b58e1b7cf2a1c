"""Operations: CLI and env configuration, probes, metrics, logs, URL expiry, startup failures."""

import json
import time

import httpx

from tests.support.server import ServerProcess
from tests.support.waiting import until

FAST = {"num_inference_steps": 2}


def test_flags_override_environment(make_server):
    srv = ServerProcess({"MODEL_NAME": "from-env"})
    srv.command = [*srv.command, "--model-name", "from-flag"]
    srv.start()
    try:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "from-flag"
    finally:
        srv.stop()


def test_metrics_expose_the_promised_series(server, client):
    client.images.generate(prompt="m", size="256x256", n=2, extra_body=FAST)
    text = httpx.get(server.url + "/metrics").text
    for series in (
        'image_server_requests_total{route="/v1/images/generations",status="200"}',
        "image_server_queue_depth",
        "image_server_in_flight",
        "image_server_ready 1.0",
        "image_server_batch_size_bucket",
        "image_server_queue_wait_seconds_bucket",
        "image_server_generation_seconds_bucket",
        "image_server_postprocess_seconds_bucket",
        "image_server_encode_seconds_bucket",
        "image_server_images_total",
        "image_server_running 0.0",  # the capacity signals (docs/DEPLOYMENT.md): idle again
        "image_server_queue_oldest_seconds 0.0",
    ):
        assert series in text, series
    assert 0 < server.metric("image_server_utilization") <= 1  # the engine generated within the last 30 s


def test_server_timing_and_request_id_headers(server):
    response = httpx.post(
        server.url + "/v1/images/generations",
        json={"prompt": "t", "size": "256x256", **FAST},
        headers={"X-Request-Id": "abc-123"},
        timeout=60,
    )
    assert response.headers["x-request-id"] == "abc-123"
    timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    assert set(timing) == {"queue", "gen", "post"}
    assert float(timing["gen"]) > 0
    until(lambda: "request_id=abc-123" in server.logs(), 30, "the access log line")  # written after the answer
    assert "status=200" in server.logs()


def test_json_logs_one_line_per_request(make_server):
    srv = make_server({"LOG_JSON": "true"})
    httpx.post(srv.url + "/v1/images/generations", json={"prompt": "j", "size": "256x256", **FAST}, timeout=60)
    httpx.post(srv.url + "/v1/images/generations", json={"prompt": "j", "size": "1x1"})
    until(lambda: srv.logs().count('"path": "/v1/images/generations"') == 2, 30, "two access log lines")
    lines = srv.logs().splitlines()
    entries = [json.loads(line) for line in lines]  # every line, the libraries' warnings included, is one object
    # no library noise on a CPU machine: torchvision missing, torchao's kernels built for another Python or GPU
    assert [e for e in entries if e["level"] == "warning"] == []
    requests = [e for e in entries if e.get("path") == "/v1/images/generations"]
    assert [e["status"] for e in requests] == [200, 400]
    assert {"request_id", "queue_seconds", "gen_seconds", "post_seconds"} <= set(requests[0])


def image_url(srv) -> str:
    body = {"prompt": "u", "size": "256x256", "response_format": "url", **FAST}
    return httpx.post(srv.url + "/v1/images/generations", json=body, timeout=60).json()["data"][0]["url"]


def test_url_images_expire_after_ttl(make_server):
    srv = make_server({"IMAGE_TTL": "2"})
    url = image_url(srv)
    assert httpx.get(url).status_code == 200
    time.sleep(3.5)
    assert httpx.get(url).status_code == 404


def test_public_url_setting(make_server):
    srv = make_server({"PUBLIC_URL": "https://img.example.org/"})
    assert image_url(srv).startswith("https://img.example.org/v1/images/")


def test_health_answers_while_loading_and_ready_waits(make_server):
    srv = make_server(wait=False)
    saw_loading = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(srv.url + "/ready", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        assert httpx.get(srv.url + "/health").status_code == 200
        if ready.status_code == 503:
            saw_loading = True
            assert ready.json()["error"]["code"] == "loading"
            response = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "early"})
            if response.status_code == 503:  # still loading: refused with a retry hint
                assert response.headers["retry-after"]
                assert response.json()["error"]["code"] == "model_loading"
        if ready.status_code == 200:
            break
    assert ready.status_code == 200
    assert saw_loading


def test_bad_model_path_exits_nonzero_with_a_clear_message(tmp_path):
    srv = ServerProcess({"MODEL_PATH": str(tmp_path / "missing")})
    srv.start(wait=False)
    assert srv.proc.wait(60) == 1
    assert "is not a diffusers model folder" in srv.logs()
