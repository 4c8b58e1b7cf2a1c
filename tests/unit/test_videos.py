"""server/video_api.py and server/videos.py in process: /v1/videos through the OpenAI SDK and httpx, the real app,
scheduler, job store and encoder around the fake engine (tests/support/fakes.py), whose video family makes
8 frames per second in 1 + 4k frames: "0.5" seconds is 5 frames."""

import base64
import json
import threading
import time

import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.attacks import HostileServer
from server.families import GENERIC
from server.videos import VideoCall
from tests.support.fakes import FAILED_FILE, FakeEngine, InProcess, folders
from tests.support.images import assert_openai_shape, png_bytes
from tests.support.videos import decode_mp4, image_of
from tests.support.waiting import until

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK warns on every call

KEYS = {"alice": "alice-key", "bob": "bob-key", "carol": "carol-key"}
RED = (200, 30, 90)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    with InProcess(api_key=",".join(KEYS.values()), video_dir=folder, max_queue=2) as running:
        yield running


def sdk(app: InProcess, who: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEYS[who], http_client=app.http)


def auth(who: str = "alice") -> dict:
    return {"authorization": f"Bearer {KEYS[who]}"}


def made(client: openai.OpenAI, **fields):
    return client.videos.poll(client.videos.create(**fields).id, poll_interval_ms=10)


def test_create_and_poll_then_download_an_h264_mp4(app):
    client = sdk(app)
    video = client.videos.create_and_poll(prompt="a wave", seconds="0.5", size="80x64", poll_interval_ms=10)
    assert (video.status, video.progress, video.seconds, video.size) == ("completed", 100, "0.5", "80x64")
    assert video.model == "fake-model" and video.expires_at > video.completed_at >= video.created_at
    decoded = decode_mp4(client.videos.download_content(video.id).content)
    assert (decoded.codec, decoded.fps, len(decoded.frames), decoded.size) == ("h264", 8.0, 5, (80, 64))
    thumbnail = image_of(client.videos.download_content(video.id, variant="thumbnail").content)
    assert (thumbnail.format, thumbnail.size) == ("WEBP", (80, 64))
    sheet = image_of(client.videos.download_content(video.id, variant="spritesheet").content)
    assert sheet.format == "JPEG" and sheet.size == (80 * 3, 64 * 2)  # 5 frames: 3 columns, 2 rows


def test_defaults_come_from_the_model(app):
    video = made(sdk(app), prompt="defaults")
    assert (video.seconds, video.size) == ("1", "64x64")  # 9 frames at 8 fps
    spec = app.engine.calls[-1].specs[0]
    assert (spec.frames, spec.steps, spec.n, spec.mode) == (9, 8, 1, "text2img")


def test_extensions_reach_the_engine(app):
    body = {"prompt": "x", "seconds": "0.5", "seed": 42, "num_inference_steps": 3, "negative_prompt": "blur"}
    made(sdk(app), prompt="x", seconds="0.5", extra_body={k: body[k] for k in list(body)[2:]})
    spec = app.engine.calls[-1].specs[0]
    assert (spec.seeds, spec.steps, spec.negative_prompt, spec.frames) == ([42], 3, "blur", 5)


@pytest.mark.parametrize("how", ["multipart file", "json data url", "multipart data url"])
def test_image_to_video_from_a_reference(app, how):
    reference = png_bytes(Image.new("RGB", (64, 64), RED))
    data_url = "data:image/png;base64," + base64.b64encode(reference).decode()
    if how == "multipart file":
        file = ("ref.png", reference, "image/png")
        video_id = sdk(app).videos.create(prompt="i2v", seconds="0.5", input_reference=file).id
    elif how == "json data url":
        body = {"prompt": "i2v", "seconds": "0.5", "input_reference": {"image_url": data_url}}
        video_id = app.http.post("/v1/videos", json=body, headers=auth()).json()["id"]
    else:  # as the SDK would serialize a reference object, had its file extraction not refused it
        form = {"prompt": "i2v", "seconds": "0.5", "input_reference[image_url]": data_url}
        video_id = app.http.post("/v1/videos", data=form, files={"x": ("x", b"")}, headers=auth()).json()["id"]
    video = sdk(app).videos.poll(video_id, poll_interval_ms=10)
    assert app.engine.calls[-1].specs[0].mode == "img2img"
    first = decode_mp4(sdk(app).videos.download_content(video.id).content).frames[0]
    assert np.abs(np.asarray(first, dtype=np.int16) - RED).mean() < 8  # the reference is the first frame


def test_progress_follows_the_steps_while_the_job_runs(app):
    client = sdk(app)
    app.engine.gate.clear()
    try:
        first = client.videos.create(prompt="running", seconds="0.5", extra_body={"num_inference_steps": 4})
        assert first.status == "queued" and first.progress == 0
        app.engine.entered.acquire(timeout=10)
        second = client.videos.create(prompt="waiting", seconds="0.5")
        running = client.videos.retrieve(first.id)
        assert (running.status, running.progress) == ("in_progress", 25)  # the fake reports 1 of 4 steps
        assert client.videos.retrieve(second.id).status == "queued"
    finally:
        app.engine.gate.set()
    assert client.videos.poll(second.id, poll_interval_ms=10).status == "completed"


def test_a_key_at_its_share_and_a_full_queue_are_429s_that_store_nothing(app):
    clients = {who: sdk(app, who).with_options(max_retries=0) for who in ("alice", "carol")}
    alice = clients["alice"]
    app.engine.gate.clear()
    try:
        running = alice.videos.create(prompt="running", seconds="0.5")
        app.engine.entered.acquire(timeout=10)
        queued = {"alice": alice.videos.create(prompt="queued", seconds="0.5")}  # MAX_QUEUE=2: one place per key
        count = len(list(alice.videos.list(limit=100)))
        with pytest.raises(openai.RateLimitError) as share:
            alice.videos.create(prompt="past alice's share", seconds="0.5")
        queued["carol"] = clients["carol"].videos.create(prompt="carol's", seconds="0.5")  # carol is still admitted
        with pytest.raises(openai.RateLimitError) as full:
            alice.videos.create(prompt="one too many", seconds="0.5")
        assert len(list(alice.videos.list(limit=100))) == count
    finally:
        app.engine.gate.set()
    assert share.value.body["code"] == "tenant_queue_full" and share.value.response.headers["retry-after"]
    assert full.value.body["code"] == "queue_full" and full.value.response.headers["retry-after"]
    for who, job in [("alice", running), *queued.items()]:
        assert clients[who].videos.poll(job.id, poll_interval_ms=10).status == "completed"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seconds": "0.3"}, "seconds"),  # 2.4 frames past the first: not 4k
        ({"seconds": "3"}, "seconds"),  # 25 frames: more than the model makes
        ({"seconds": "-1"}, "seconds"),
        ({"seconds": "１"}, "seconds"),  # a fullwidth digit
        ({"seconds": 1}, "seconds"),  # OpenAI's seconds is a string
        ({"size": "72x64"}, "size"),  # not a multiple of 16
        ({"size": "64x64\n"}, "size"),
        ({"size": "8192x8192"}, "size"),
        ({"prompt": ""}, "prompt"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),  # strict types, as for images
        ({"seed": "5"}, "seed"),
        ({"num_inference_steps": 2.0}, "num_inference_steps"),
        ({"input_reference": {"file_id": "file_1"}}, "input_reference"),
        ({"input_reference": {"image_url": "data:image/png;base64,AAAA"}}, "input_reference"),
    ],
)
def test_what_does_not_fit_is_a_400_naming_the_field(app, fields, param):
    count = len(app.service.engine.calls)
    response = app.http.post("/v1/videos", json={"prompt": "p", **fields}, headers=auth())
    assert response.status_code == 400, response.text
    assert assert_openai_shape(response.json())["param"].startswith(param)
    assert len(app.service.engine.calls) == count


@pytest.mark.parametrize(
    ("fields", "param"), [({"seed": "true"}, "seed"), ({"num_inference_steps": "2.5"}, "num_inference_steps")]
)
def test_multipart_text_that_is_not_its_field_s_type_is_a_400(app, fields, param):
    """The SDK sends multipart: its text is read by each field's type (extensions in extra_body work), and what
    is not that type is refused as in JSON."""
    form = {"prompt": "p", "seconds": "0.5", **fields}
    response = app.http.post("/v1/videos", data=form, files={"x": ("x", b"")}, headers=auth())
    assert response.status_code == 400 and assert_openai_shape(response.json())["param"] == param


def test_a_bad_seconds_is_a_400_through_the_sdk_too(app):
    with pytest.raises(openai.BadRequestError) as err:
        sdk(app).videos.create(prompt="p", seconds="4")
    assert err.value.body["param"] == "seconds" and "at most 2 seconds" in err.value.body["message"]


def test_list_pages_through_every_job_in_order(app):
    client = sdk(app, "bob")
    ids = [made(client, prompt=f"page {i}", seconds="0.5").id for i in range(3)]
    first = client.videos.list(limit=2, order="asc")
    assert [v.id for v in first.data] == ids[:2] and first.has_more and first.last_id == ids[1]
    assert [v.id for v in client.videos.list(limit=2, order="asc")] == ids  # the SDK follows last_id
    assert [v.id for v in client.videos.list(order="desc")] == ids[::-1]
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order"), ("after=x", "after")):
        response = app.http.get(f"/v1/videos?{query}", headers=auth("bob"))
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_jobs_belong_to_the_key_that_created_them(app):
    video = made(sdk(app, "alice"), prompt="mine", seconds="0.5")
    bob = sdk(app, "bob")
    assert video.id not in [v.id for v in bob.videos.list(limit=100)]
    for call in (
        lambda: bob.videos.retrieve(video.id),
        lambda: bob.videos.download_content(video.id),
        lambda: bob.videos.delete(video.id),
        lambda: bob.videos.remix(video.id, prompt="theirs"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert sdk(app, "alice").videos.retrieve(video.id).status == "completed"
    assert app.http.get(f"/v1/videos/{video.id}").status_code == 401


def test_delete_removes_the_job_and_its_files(app):
    client = sdk(app)
    video = made(client, prompt="gone", seconds="0.5")
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    assert not (app.settings.videos_path / video.id).exists()
    for call in (lambda: client.videos.retrieve(video.id), lambda: client.videos.download_content(video.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_deleting_a_running_job_stops_it(app):
    client = sdk(app)
    app.engine.gate.clear()
    try:
        job = client.videos.create(prompt="stop me", seconds="0.5")
        app.engine.entered.acquire(timeout=10)
        client.videos.delete(job.id)
        assert app.engine.calls[-1].progress.should_stop()  # the batch stops at its next step
    finally:
        app.engine.gate.set()
    until(lambda: not app.app.state.videos.running, 10, "the job's task to end")
    assert not (app.settings.videos_path / job.id).exists()


def test_remix_makes_the_same_video_from_a_new_prompt(app):
    client = sdk(app)
    source = made(client, prompt="a cat", seconds="0.5", size="80x64", extra_body={"seed": 7})
    remix = client.videos.poll(client.videos.remix(source.id, prompt="a dog").id, poll_interval_ms=10)
    assert (remix.status, remix.prompt, remix.remixed_from_video_id) == ("completed", "a dog", source.id)
    assert (remix.seconds, remix.size) == ("0.5", "80x64")
    spec = app.engine.calls[-1].specs[0]
    assert (spec.prompt, spec.seeds, spec.frames) == ("a dog", [7], 5)


def test_what_is_not_finished_cannot_be_downloaded_or_remixed(app):
    client = sdk(app)
    app.engine.gate.clear()
    try:
        job = client.videos.create(prompt="not yet", seconds="0.5")
        with pytest.raises(openai.BadRequestError) as err:
            client.videos.download_content(job.id)
        assert err.value.body["code"] == "video_not_ready"
        with pytest.raises(openai.BadRequestError):
            client.videos.remix(job.id, prompt="too soon")
    finally:
        app.engine.gate.set()
    client.videos.poll(job.id, poll_interval_ms=10)
    response = app.http.get(f"/v1/videos/{job.id}/content?variant=poster", headers=auth())
    assert response.status_code == 400 and response.json()["error"]["param"] == "variant"


def test_an_engine_failure_fails_the_job_naming_no_path(app):
    video = made(sdk(app), prompt="EXPLODE", seconds="0.5")
    assert video.status == "failed" and video.error.code == "engine_error" and video.expires_at
    assert "the server log has the reason" in video.error.message and FAILED_FILE not in video.error.message


def test_unknown_ids_are_404(app):
    for path in ("/v1/videos/video_nope", "/v1/videos/..%2F..%2Fetc/content", f"/v1/videos/{'x' * 5000}"):
        response = app.http.get(path, headers=auth())
        assert response.status_code == 404, path
        assert_openai_shape(response.json())


def test_a_model_without_video_says_so(tmp_path):
    with InProcess(FakeEngine(family=GENERIC), video_dir=tmp_path) as app:
        response = app.http.post("/v1/videos", json={"prompt": "p"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported"


def test_a_restart_keeps_completed_videos(tmp_path):
    with InProcess(video_dir=tmp_path) as first:
        video = made(first.client(), prompt="kept", seconds="0.5")
        content = first.client().videos.download_content(video.id).content
    with InProcess(video_dir=tmp_path) as second:
        again = second.client().videos.retrieve(video.id)
        assert again.model_dump() == video.model_dump()
        assert second.client().videos.download_content(video.id).content == content


def test_multipart_fields_and_json_bodies_say_what_is_wrong(app):
    response = app.http.post("/v1/videos", content=b"prompt=x", headers={**auth(), "content-type": "text/plain"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_media_type"
    response = app.http.post("/v1/videos", content=b"{", headers={**auth(), "content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    form = {"prompt": "p", "seconds": "0.5", "input_reference": "not a file"}
    response = app.http.post("/v1/videos", data=form, files={"x": ("x", b"")}, headers=auth())
    assert response.status_code == 400 and response.json()["error"]["param"] == "input_reference"
    response = app.http.post("/v1/videos", files={"input_reference": ("r.png", b"junk")}, data=form, headers=auth())
    assert response.status_code == 400, json.dumps(response.json())


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["prompt", "model", "seconds", "size", "seed", "num_inference_steps", "guidance_scale", "input_reference"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5), multipart=st.booleans())
def test_no_body_makes_a_5xx(fuzz_app, body, multipart):
    if multipart:
        form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
        response = fuzz_app.http.post("/v1/videos", data=form, files={"x": ("x", b"")})
    else:
        response = fuzz_app.http.post("/v1/videos", json=body)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_openai_shape(response.json())


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    with InProcess(video_dir=tmp_path_factory.mktemp("fuzz"), max_queue=1000) as running:
        yield running


def test_a_fetched_reference_comes_to_disk_and_its_request_s_end_removes_it(tmp_path):
    """A remote input_reference is written to the request's spool as it comes (here it trickles until the
    request's deadline), MAX_IMAGE_MB of the input disk reserved before the fetch; the request's owner removes
    the file and gives the disk back when the request ends."""
    gauge = "image_server_input_disk_bytes"
    with HostileServer(interval=0.2) as target:
        host = target.url.removeprefix("http://")
        with InProcess(video_dir=tmp_path, remote_image_hosts=host, max_image_mb=1, request_timeout=2) as app:
            body = {"prompt": "i2v", "seconds": "0.5", "input_reference": {"image_url": target.url + "/ref.png"}}
            answers: list = []
            posting = threading.Thread(target=lambda: answers.append(app.http.post("/v1/videos", json=body)))
            posting.start()
            until(lambda: list(app.service.spool.root.glob("*/fetched.*")), timeout=10, what="the fetch on disk")
            assert app.metric(gauge) == 2**20
            posting.join(10)
            assert answers[0].status_code == 504
            until(lambda: app.metric(gauge) == 0, timeout=10, what="the disk given back")
            assert not folders(app.service.spool.root)


def test_a_job_deleted_before_its_task_ran_gives_its_pixels_back(tmp_path):
    """The job's task cancelled before its first step never runs its body: what the job holds is given back by
    the task's end, not by code inside it."""
    gauge = "image_server_input_memory_bytes"
    reference = "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (80, 64), RED))).decode()
    with InProcess(video_dir=tmp_path) as app:
        videos, spool = app.app.state.videos, app.service.spool.request("default")

        async def create_then_delete() -> None:
            body = {"prompt": "i2v", "seconds": "0.5", "input_reference": {"image_url": reference}}
            video = await videos.create(VideoCall("default", body, time.monotonic() + 10, spool))
            assert app.service.memory.held["default"] == 3 * 80 * 64
            await videos.delete("default", video.id)  # cancels the task before the loop has run it

        try:
            app.http.portal.call(create_then_delete)
        finally:
            spool.remove()
        until(lambda: app.metric(gauge) == 0, timeout=10, what="the deleted job's pixels given back")


def test_a_reference_s_pixels_hold_input_memory_until_its_job_ends(tmp_path):
    gauge = "image_server_input_memory_bytes"
    reference = "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (80, 64), RED))).decode()
    with InProcess(video_dir=tmp_path) as app:
        app.engine.gate.clear()
        try:
            body = {"prompt": "i2v", "seconds": "0.5", "input_reference": {"image_url": reference}}
            created = app.http.post("/v1/videos", json=body)
            assert created.status_code == 200
            assert app.metric(gauge) == 3 * 80 * 64  # the request has ended; its job holds the pixels
        finally:
            app.engine.gate.set()
        until(lambda: app.metric(gauge) == 0, timeout=10, what="the job's pixels given back")
        assert app.http.get(f"/v1/videos/{created.json()['id']}").json()["status"] == "completed"
