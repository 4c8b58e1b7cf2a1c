"""server/budget.py: the input memory budget on its own, then through the app (in process, a fake engine)."""

import base64
import io
import json
import os
import threading

import pytest
from PIL import Image

from server.budget import InputBudget, body_bytes
from server.errors import APIError
from server.metrics import Metrics
from tests.support.fakes import InProcess
from tests.support.waiting import until

MIB = 2**20
GAUGE = "image_server_input_memory_bytes"
JSON = {"content-type": "application/json"}
SIDE = 512  # of the edits' images
PIXELS = 3 * SIDE * SIDE  # what an edit's image holds once decoded
# the largest request holds 6.75 MiB: 2 x (2 + 1) for its parsed body and fetches, 3 bytes x 256 Ki pixels
SMALL = {"max_body_mb": 2, "max_image_mb": 1, "max_input_pixels": SIDE * SIDE}


def budget(total: int, share: float = 0.5) -> InputBudget:
    return InputBudget(total, share, Metrics().input_memory)


def refused(take) -> str:
    with pytest.raises(APIError) as caught:
        take()
    assert caught.value.status == 429 and int(caught.value.headers["Retry-After"]) >= 1
    return caught.value.code


def test_a_tenant_past_its_share_is_refused_while_another_is_admitted_until_the_budget_is_full():
    memory = budget(100)
    a, b = memory.reservation("a"), memory.reservation("b")
    a.resize(60)  # one request takes what it needs, past the share, while its tenant holds nothing else
    assert refused(lambda: memory.reservation("a").resize(1)) == "tenant_input_memory_full"
    b.resize(30)
    assert refused(lambda: memory.reservation("c").resize(11)) == "input_memory_full"
    assert refused(lambda: b.take(20)) == "input_memory_full"
    assert (a.bytes, b.bytes, memory.held.total()) == (60, 30, 90)  # a refusal takes nothing
    a.take(10)  # a request grows its own reservation: only its tenant's other requests count against the share
    a.release()
    b.release()
    b.release()  # idempotent
    assert memory.held.total() == 0 and not memory.held


def test_small_bodies_bypass_and_large_ones_count_each_copy():
    assert body_bytes(64 * 1024) == 0
    assert body_bytes(64 * 1024 + 1) == 3 * (64 * 1024 + 1)
    assert body_bytes(MIB, 2) == 2 * MIB


def noise_edit(side: int = SIDE) -> bytes:
    """A JSON edit of about 1 MiB: a PNG of noise as a data URL."""
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    return json.dumps({"prompt": "p", "size": "64x64", "images": [{"image_url": url}]}).encode()


def edit(app: InProcess, body, headers: dict | None = None):
    return app.http.post("/v1/images/edits", content=body, headers={**JSON, **(headers or {})})


def _post(app: InProcess, answers: list, body: bytes, headers: dict) -> threading.Thread:
    thread = threading.Thread(target=lambda: answers.append(edit(app, body, headers)))
    thread.start()
    return thread


def test_a_tenant_over_its_share_gets_429_before_its_body_is_read_while_another_key_is_served():
    keys = {"authorization": "Bearer key-a"}, {"authorization": "Bearer key-b"}
    body = noise_edit()
    size = len(body)
    with InProcess(api_key="key-a,key-b", input_memory_mb=8, max_batch=1, **SMALL) as app:
        app.engine.gate.clear()
        answers: list = []
        threads = [_post(app, answers, body, keys[0])]
        until(lambda: app.metric(GAUGE) == 2 * size + PIXELS, timeout=10)  # parsed and decoded: copy and pixels
        own = edit(app, body, keys[0])
        threads.append(_post(app, answers, body, keys[1]))
        until(lambda: app.metric(GAUGE) == 4 * size + 2 * PIXELS, timeout=10)
        app.engine.gate.set()
        for thread in threads:
            thread.join(10)
        until(lambda: app.metric(GAUGE) == 0, timeout=10)
    assert own.status_code == 429 and own.json()["error"]["code"] == "tenant_input_memory_full"
    assert [a.status_code for a in answers] == [200, 200]


def test_a_chunked_body_reserves_as_it_comes_and_every_ending_releases():
    body = noise_edit()
    size = len(body)
    with InProcess(input_memory_mb=7, request_timeout=2, max_batch=1, **SMALL) as app:
        app.engine.gate.clear()
        waiting = threading.Thread(target=lambda: edit(app, body))
        waiting.start()
        until(lambda: app.metric(GAUGE) == 2 * size + PIXELS, timeout=10)
        chunks = (b"x" * 65536 for _ in range(24))  # 1.5 MiB without a Content-Length: past the rest at 1.4 MiB
        full = edit(app, chunks)
        assert full.status_code == 429 and full.json()["error"]["code"] == "input_memory_full"
        assert app.metric(GAUGE) == 2 * size + PIXELS  # the refused body holds nothing
        waiting.join(10)  # past REQUEST_TIMEOUT its owner cancels it: 504, and its memory is released
        assert app.metric(GAUGE) == 0
        bad = edit(app, b"[" * MIB)
        assert bad.status_code == 400 and app.metric(GAUGE) == 0


def test_the_budget_holds_at_least_the_largest_request():
    from server.config import ConfigError, from_env

    # 2 x (64 + 50): a 64 MiB body parsed, two remote images; and 50 M pixels decoded, 3 bytes each
    largest = 2 * (64 + 50) * MIB + 3 * 50_000_000
    assert from_env().input_memory_bytes == largest
    assert from_env(api_key="a,b").input_memory_bytes == 2 * largest  # room for it in each tenant's share (0.5)
    small_inputs = {"max_image_mb": 10, "max_input_pixels": 2**20}
    assert from_env(max_body_mb=100, **small_inputs).input_memory_bytes == 300 * MIB  # 3 copies while parsed
    with pytest.raises(ConfigError, match=r"INPUT_MEMORY_MB=200 is below what the largest request holds, 371\.05"):
        from_env(input_memory_mb=200)


def test_a_body_promised_and_not_sent_holds_nothing():
    """Its Content-Length is checked against what is free, but only the bytes that come are reserved."""
    memory = budget(100)
    promised = memory.reservation("a")
    promised.check(90)  # fits: nothing taken
    assert memory.held.total() == 0
    memory.reservation("b").resize(50)
    assert refused(lambda: promised.check(60)) == "input_memory_full"
    assert promised.bytes == 0 and memory.held.total() == 50
