"""server/api.py and server/middleware.py in process: the real app around a fake engine (tests/support/fakes.py)."""

import asyncio
import contextlib
import gc
import json
import re
import threading
from types import SimpleNamespace

import openai
import pytest

from server.api import EventStreamResponse
from server.auth import key_label
from server.http import CONNECTION
from server.middleware import Life, RequestLife
from server.protocol import StreamEvent
from server.service import EventStream
from tests.support.fakes import FAILED_FILE, InProcess
from tests.support.images import assert_openai_shape, decode_b64, gradient, png_bytes
from tests.support.waiting import until


@pytest.fixture(scope="module")
def app():
    with InProcess(max_batch=4) as running:
        yield running


def test_generation_through_the_sdk(app):
    result = app.client().images.generate(prompt="a fox", size="256x128", n=2, extra_body={"seed": 5})
    assert [d.model_extra["seed"] for d in result.data] == [5, 6]
    assert result.quality == "high" and result.output_format == "jpeg" and result.size == "256x128"
    assert decode_b64(result.data[0].b64_json).size == (256, 128)


@pytest.mark.parametrize(("quality", "steps"), [("low", 4), ("medium", 6), ("high", 8), ("auto", 8), ("hd", 8)])
def test_quality_selects_the_step_preset(app, quality, steps):
    before = len(app.engine.calls)
    app.client().images.generate(prompt="q", size="64x64", quality=quality)
    assert app.engine.calls[before].specs[0].steps == steps  # the fake model's default is 8


def test_explicit_steps_win_over_quality(app):
    before = len(app.engine.calls)
    app.client().images.generate(prompt="q", size="64x64", quality="low", extra_body={"num_inference_steps": 3})
    assert app.engine.calls[before].specs[0].steps == 3


def test_request_id_is_echoed_only_when_it_is_a_plain_token(app):
    good = app.http.post(
        "/v1/images/generations", json={"prompt": "x", "size": "64x64"}, headers={"x-request-id": "abc-1"}
    )
    assert good.headers["x-request-id"] == "abc-1"
    forged = app.http.post("/v1/nothing", headers={"x-request-id": b"a\xe2\x80\xa8b status=200 forged"})
    assert forged.headers["x-request-id"].startswith("req_")


def test_413_from_content_length_carries_a_request_id_and_is_counted(app):
    before = app.metric("image_server_requests_total", 'status="413"')
    response = app.http.post("/v1/images/generations", content=b"x" * 100, headers={"content-length": str(2**40)})
    assert response.status_code == 413
    assert response.headers["x-request-id"].startswith("req_")
    assert_openai_shape(response.json())
    assert app.metric("image_server_requests_total", 'status="413"') == before + 1


def test_a_bug_is_an_openai_shaped_500_with_a_request_id(app, monkeypatch):
    monkeypatch.setattr(app.service, "images", _explode)
    response = app.http.post("/v1/images/generations", json={"prompt": "x"})
    assert response.status_code == 500
    assert assert_openai_shape(response.json())["code"] == "internal_error"
    assert response.headers["x-request-id"].startswith("req_")


async def _explode(call):
    raise RuntimeError("a bug")


def test_an_engine_failure_is_a_500_that_names_no_path_or_exception(app):
    """Before: "The engine failed to generate the image: [Errno 2] No such file or directory: '/srv/...'"."""
    response = app.http.post("/v1/images/generations", json={"prompt": "EXPLODE", "size": "64x64"})
    error = assert_openai_shape(response.json())
    assert response.status_code == 500 and error["code"] == "engine_error"
    assert FAILED_FILE not in error["message"] and "No such file" not in error["message"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),  # deeper than the recursion limit
        (b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}", "invalid_json"),  # past int's digit limit
        (b'{"prompt": "x", "guidance_scale": NaN}', "invalid_json"),
        (b'{"prompt": "x", "seed": [' + b"1," * 60_000 + b"1]}", "invalid_json"),  # more values than any request
        (b'{"prompt": "x", "seed": [1,2,3,4,5,6,7,8,9,10,11]}', "invalid_value"),
    ],
    ids=["deep", "digits", "nan", "many-values", "eleven-seeds"],
)
def test_hostile_json_is_a_400(app, body, code):
    response = app.http.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert assert_openai_shape(response.json())["code"] == code


@pytest.mark.parametrize(
    "fields",
    [
        [("prompt", "a"), ("prompt[]", "b")],
        [("prompt[]", "b"), ("prompt", "a")],
        [("loras", "[]"), ("loras[name]", "x")],
        [("loras[][name]", "x"), ("loras[]", "y"), ("loras[][name]", "z")],
        [("prompt", "a"), ("prompt", "b")],
    ],
    ids=["plain-then-list", "list-then-plain", "list-then-object", "mixed-list", "twice"],
)
def test_multipart_key_clashes_are_400s(app, fields):
    files = [("image", ("a.png", png_bytes(gradient(64, 64)), "image/png"))]
    response = app.http.post("/v1/images/edits", data=fields, files=files)
    assert response.status_code == 400, response.text
    assert_openai_shape(response.json())


def test_429_and_503_close_the_connection_and_retry_after_follows_the_queue():
    with InProcess(max_queue=1, max_batch=1) as app:
        app.engine.gate.clear()
        results = []
        threads = [
            threading.Thread(target=lambda b=body: results.append(app.http.post("/v1/images/generations", json=b)))
            for body in ({"prompt": "running", "size": "64x64", "n": 4}, {"prompt": "queued", "size": "64x64", "n": 4})
        ]
        threads[0].start()
        app.engine.entered.acquire(timeout=10)
        threads[1].start()
        until(lambda: app.service.scheduler.depth == 1)
        app.service.scheduler.seconds_per_image = 2.5
        full = app.http.post("/v1/images/generations", json={"prompt": "one too many", "size": "64x64"})
        app.engine.gate.set()
        for t in threads:
            t.join(10)
    assert full.status_code == 429
    assert full.headers["connection"] == "close"
    assert int(full.headers["retry-after"]) == 20  # 8 images queued and running at 2.5 s each
    assert [r.status_code for r in results] == [200, 200]


def test_the_sdk_sees_stream_events_in_order(app):
    events = list(app.client().images.generate(prompt="s", size="64x64", n=2, stream=True, extra_body={"seed": 8}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert [e.model_extra["seed"] for e in events] == [8, 9]


def test_an_error_after_the_stream_began_is_an_error_event(app):
    response = app.http.post("/v1/images/generations", json={"prompt": "EXPLODE", "size": "64x64", "stream": True})
    assert response.status_code == 200
    error = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert error[-1]["error"]["code"] == "engine_error"
    with pytest.raises(openai.APIError):
        list(app.client().images.generate(prompt="EXPLODE", size="64x64", stream=True))


def test_openapi_has_the_response_schemas(app):
    spec = app.http.get("/openapi.json").json()
    responses = spec["paths"]["/v1/images/generations"]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ImagesResponse")
    events = [ref["$ref"] for ref in responses["200"]["content"]["text/event-stream"]["schema"]["oneOf"]]
    assert events == ["#/components/schemas/StreamEvent", "#/components/schemas/ErrorEvent"]
    assert responses["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "ImagesResponse" in spec["components"]["schemas"]


def test_every_reference_in_openapi_names_a_published_component(app):
    """The event schemas were once inlined with their own `#/$defs/...` references, which resolve nowhere."""
    spec = app.http.get("/openapi.json").json()
    refs = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(spec)))
    published = {f"#/components/schemas/{name}" for name in spec["components"]["schemas"]}
    assert refs and refs <= published


def test_each_image_streams_its_partial_images_in_order_then_its_completed_one(app):
    events = list(
        app.client().images.generate(
            prompt="p", size="64x64", n=2, stream=True, partial_images=3, extra_body={"seed": 1}
        )
    )
    for seed in (1, 2):
        mine = [e for e in events if e.model_extra["seed"] == seed]
        assert [e.type for e in mine] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
        assert [e.partial_image_index for e in mine[:3]] == [0, 1, 2]
        assert len({e.b64_json for e in mine}) == 4


def test_a_partial_image_that_fails_is_left_out_and_the_image_still_comes(app):
    events = list(app.client().images.generate(prompt="BADPREVIEW", size="64x64", stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_partial_images_without_stream_changes_nothing(app):
    before = len(app.engine.calls)
    result = app.client().images.generate(prompt="p", size="64x64", partial_images=2)
    assert result.data[0].b64_json and app.engine.calls[before].specs[0].partial_images == 0


# -- the request's owner (RequestLife) and its streams ------------------------------------------------------


def asgi_run(middleware, app_body, connection=None):
    """Runs `app_body(life)` behind `middleware` as one request; returns what was sent and the Life."""
    sent: list[dict] = []
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "extensions": {}}
    if connection is not None:
        scope["extensions"][CONNECTION] = connection

    async def app(scope, receive, send):
        await app_body(scope["state"]["life"], send)

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    async def main():
        await middleware(app)(scope, receive, send)

    asyncio.run(main())
    return sent, scope["state"]["life"]


def test_past_its_deadline_a_request_that_has_not_answered_gets_a_504_and_its_cleanup_runs():
    events: list[str] = []

    async def hangs(life, send):
        life.on_end(lambda: events.append("on_end"))
        try:
            await asyncio.sleep(3600)
        finally:
            events.append("cancelled")

    sent, _ = asgi_run(lambda app: RequestLife(app, timeout=0.05, grace=0.05), hangs)
    assert sent[0]["status"] == 504 and events == ["cancelled", "on_end"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "timeout"


def test_a_request_whose_client_left_is_cancelled_at_once_and_answers_nothing():
    events: list[str] = []
    connection = SimpleNamespace(gone=asyncio.Event(), abort=lambda: events.append("abort"))

    async def waits(life, send):
        life.on_end(lambda: events.append("on_end"))
        connection.gone.set()  # the client leaves while the request waits
        try:
            await asyncio.sleep(3600)
        finally:
            events.append("cancelled")

    sent, _ = asgi_run(lambda app: RequestLife(app, timeout=3600), waits, connection)
    assert sent == [] and events == ["cancelled", "on_end"]


def test_a_stream_cancelled_while_its_send_blocks_closes_its_source_at_once():
    """A client that stops reading blocks the stream in `send`, its generators suspended at a `yield`. When the
    request is cancelled there, its events must close now, not when the garbage collector finds them."""
    events: list[str] = []

    async def source():
        try:
            yield StreamEvent(
                type="image_generation.partial_image",
                b64_json="x",
                created_at=0,
                size="64x64",
                quality="high",
                output_format="png",
            )
            await asyncio.sleep(3600)
        finally:
            events.append("source closed")

    async def main():
        response = EventStreamResponse(EventStream(source(), lambda: events.append("released")))
        blocked = asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body" and message["body"]:
                blocked.set()
                await asyncio.sleep(3600)  # the client reads nothing

        async def receive():
            await asyncio.sleep(3600)

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        task = asyncio.ensure_future(response(scope, receive, send))
        await blocked.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return list(events)  # before anything else runs: no collector pass, no loop iteration

    gc.disable()
    try:
        assert asyncio.run(main()) == ["source closed"]
    finally:
        gc.enable()


# -- tenants --------------------------------------------------------------------------------------------


def _send(app: InProcess, answers: list, headers: dict) -> threading.Thread:
    body = {"prompt": "x", "size": "64x64"}
    thread = threading.Thread(
        target=lambda: answers.append(app.http.post("/v1/images/generations", json=body, headers=headers))
    )
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("settings", "first", "second"),
    [
        ({"api_key": "key-one,key-two"}, {"authorization": "Bearer key-one"}, {"authorization": "Bearer key-two"}),
        ({"tenant_header": "X-Tenant"}, {"x-tenant": "team-a"}, {"x-tenant": "team-b"}),
    ],
    ids=["api-keys", "gateway-header"],
)
def test_a_tenant_at_its_share_of_the_queue_gets_429_while_another_is_admitted(settings, first, second):
    with InProcess(max_queue=2, max_batch=1, **settings) as app:
        app.engine.gate.clear()
        answers = []
        threads = [_send(app, answers, first)]
        app.engine.entered.acquire(timeout=10)
        threads.append(_send(app, answers, first))
        until(lambda: app.service.scheduler.depth == 1)  # the first tenant holds its one place (half of 2)
        own = app.http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}, headers=first)
        threads.append(_send(app, answers, second))
        until(lambda: app.service.scheduler.depth == 2)  # the second tenant is still admitted
        app.engine.gate.set()
        for t in threads:
            t.join(10)
    assert own.status_code == 429 and own.json()["error"]["code"] == "tenant_queue_full"
    assert int(own.headers["retry-after"]) >= 1
    assert [a.status_code for a in answers] == [200, 200, 200]


def test_without_keys_or_a_gateway_header_every_request_is_one_tenant_with_the_whole_queue():
    """Neither a made-up key nor the header of a gateway that is not configured makes a new tenant (a new share)."""
    with InProcess(max_queue=2, max_batch=1) as app:
        app.engine.gate.clear()
        answers = []
        threads = [_send(app, answers, {"authorization": "Bearer made-up-0"})]
        app.engine.entered.acquire(timeout=10)
        threads += [_send(app, answers, {"authorization": f"Bearer made-up-{i}", "x-tenant": f"t{i}"}) for i in (1, 2)]
        until(lambda: app.service.scheduler.depth == 2)
        full = app.http.post("/v1/images/generations", json={"prompt": "x"}, headers={"x-tenant": "t3"})
        app.engine.gate.set()
        for t in threads:
            t.join(10)
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert [a.status_code for a in answers] == [200, 200, 200]


def test_a_gateway_header_that_is_not_a_plain_name_is_a_400_naming_it():
    with InProcess(tenant_header="X-Tenant") as app:
        response = app.http.post("/v1/images/generations", json={"prompt": "x"}, headers={"x-tenant": "a b"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "X-Tenant"
    assert_openai_shape(response.json())


def test_the_log_line_names_the_tenant_by_its_label_never_by_its_key(caplog):
    with InProcess(api_key="secret-key-1") as app, caplog.at_level("INFO", logger="server.access"):
        app.http.post(
            "/v1/images/generations",
            json={"prompt": "x", "size": "64x64"},
            headers={"authorization": "Bearer secret-key-1"},
        )
    assert f"tenant={key_label('secret-key-1')}" in caplog.text
    assert "secret-key-1" not in caplog.text


def test_every_cleanup_of_a_request_runs_when_one_fails():
    ran = []
    life = Life(deadline=0)
    life.on_end(lambda: ran.append("memory"))
    life.on_end(lambda: 1 / 0)
    life.on_end(lambda: ran.append("stream"))
    life.end()
    assert ran == ["stream", "memory"]
