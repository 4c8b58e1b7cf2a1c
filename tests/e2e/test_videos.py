"""/v1/videos end to end: real server processes on the tiny Wan 2.2 TI2V (`--model demo:wan2.2`, 24 fps, frame
counts 4k+1, sides multiples of 32), driven by the official OpenAI SDK, the MP4s decoded by PyAV (FFmpeg).

Two server processes share one VIDEO_DIR: the module's server serves every API test, then takes SIGTERM while a
job runs (it finishes within DRAIN_TIMEOUT); a second one, started on the same folder, shows that a restart keeps
the completed jobs, and takes SIGTERM with DRAIN_TIMEOUT=0 while a long job runs (it fails with the reason).
The tests run in file order: the last two end the module's server.
"""

import json
import signal

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.support.images import png_bytes
from tests.support.videos import decode_mp4, image_of
from tests.support.waiting import until

pytestmark = [
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),  # the SDK warns on every videos call
    pytest.mark.timeout(600),
]

KEYS = {"alice": "alice-key", "bob": "bob-key"}
FAST = {"num_inference_steps": 2, "seed": 3}
POLL_MS = 100


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("videos")


def video_env(video_dir, **more) -> dict[str, str]:
    return {"MODEL_PATH": "demo:wan2.2", "API_KEY": ",".join(KEYS.values()), "VIDEO_DIR": str(video_dir), **more}


@pytest.fixture(scope="module")
def wan(video_dir):
    from tests.support.server import ServerProcess

    proc = ServerProcess(video_env(video_dir)).start()
    yield proc
    proc.stop()


def sdk(server, who: str = "alice") -> openai.OpenAI:
    return server.client(api_key=KEYS[who], max_retries=0)


def made(client: openai.OpenAI, **fields):
    fields["extra_body"] = {**FAST, **fields.get("extra_body", {})}
    return client.videos.create_and_poll(poll_interval_ms=POLL_MS, **fields)


def test_create_and_poll_then_download_an_mp4_of_the_asked_frames_and_size(wan):
    client = sdk(wan)
    video = made(client, prompt="waves on a beach", seconds="0.5", size="96x64")
    assert (video.status, video.progress, video.seconds, video.size) == ("completed", 100, "0.5", "96x64")
    assert video.expires_at > video.completed_at
    decoded = decode_mp4(client.videos.download_content(video.id).content)
    assert (decoded.codec, decoded.fps, len(decoded.frames), decoded.size) == ("h264", 24.0, 13, (96, 64))
    assert np.asarray(decoded.frames[6]).std() > 1  # the model's frames, not a blank
    thumbnail = image_of(client.videos.download_content(video.id, variant="thumbnail").content)
    assert (thumbnail.format, thumbnail.size) == ("WEBP", (96, 64))
    sheet = image_of(client.videos.download_content(video.id, variant="spritesheet").content)
    assert (sheet.format, sheet.size) == ("JPEG", (96 * 4, 64 * 4))  # 13 frames: a 4x4 grid


def test_image_to_video_from_a_file(wan):
    client = sdk(wan)
    reference = ("first.png", png_bytes(Image.new("RGB", (64, 64), (220, 40, 40))), "image/png")
    video = made(client, prompt="a red card", seconds="0.5", size="64x64", input_reference=reference)
    assert video.status == "completed", video.error
    assert len(decode_mp4(client.videos.download_content(video.id).content).frames) == 13


def test_a_bad_seconds_or_size_is_a_400_naming_the_field(wan):
    client = sdk(wan)
    for fields, param in (({"seconds": "0.3"}, "seconds"), ({"seconds": "60"}, "seconds"), ({"size": "80x64"}, "size")):
        with pytest.raises(openai.BadRequestError) as err:
            client.videos.create(prompt="p", **fields)
        assert err.value.body["param"] == param, err.value.body
    response = httpx.post(
        wan.url + "/v1/videos",
        json={"prompt": "p", "seconds": 1},  # OpenAI's seconds is a string
        headers={"authorization": f"Bearer {KEYS['alice']}"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "seconds"


def test_list_pages_remix_and_delete(wan):
    client = sdk(wan, "bob")
    first = made(client, prompt="a boat", seconds="0.5", size="64x64", extra_body={"seed": 11})
    remix = client.videos.poll(client.videos.remix(first.id, prompt="a boat at night").id, poll_interval_ms=POLL_MS)
    assert (remix.status, remix.remixed_from_video_id, remix.prompt) == ("completed", first.id, "a boat at night")
    assert (remix.seconds, remix.size) == (first.seconds, first.size)
    original = decode_mp4(client.videos.download_content(first.id).content).frames[6]
    remixed = decode_mp4(client.videos.download_content(remix.id).content).frames[6]
    assert np.abs(np.asarray(original, dtype=np.int16) - np.asarray(remixed, dtype=np.int16)).max() > 0

    page = client.videos.list(limit=1, order="asc")
    assert [v.id for v in page.data] == [first.id] and page.has_more
    assert [v.id for v in client.videos.list(limit=1, order="asc")] == [first.id, remix.id]  # the SDK pages on
    assert not any(v.id == first.id for v in sdk(wan, "alice").videos.list())  # another key's jobs are not listed
    with pytest.raises(openai.NotFoundError):
        sdk(wan, "alice").videos.download_content(first.id)

    assert client.videos.delete(remix.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(remix.id)
    assert [v.id for v in client.videos.list()] == [first.id]


def test_sigterm_lets_a_running_job_finish(wan, video_dir):
    client = sdk(wan)
    job = client.videos.create(prompt="the last one", seconds="2", size="64x64", extra_body={"num_inference_steps": 8})
    until(lambda: client.videos.retrieve(job.id).status == "in_progress", 60, "the job to start")
    wan.signal(signal.SIGTERM)
    assert wan.proc.wait(120) == 0
    assert stored(video_dir, job.id)["status"] == "completed"


def test_a_restart_keeps_completed_jobs_and_a_job_past_the_drain_fails(make_server, video_dir):
    server = make_server(video_env(video_dir, DRAIN_TIMEOUT="0"))
    client = sdk(server)
    kept = list(client.videos.list(limit=100))
    assert len(kept) >= 3 and all(v.status == "completed" for v in kept)
    assert len(decode_mp4(client.videos.download_content(kept[0].id).content).frames) == 49  # "2" seconds

    job = client.videos.create(prompt="too long", seconds="5", size="64x64", extra_body={"num_inference_steps": 100})
    until(lambda: 0 < client.videos.retrieve(job.id).progress < 100, 60, "progress from the denoising steps")
    assert client.videos.retrieve(job.id).status == "in_progress"
    server.signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    failed = stored(video_dir, job.id)
    assert failed["status"] == "failed" and failed["error"]["code"] == "shutting_down"


def stored(video_dir, video_id: str) -> dict:
    """The job as the store left it on the volume."""
    return json.loads((video_dir / video_id / "job.json").read_text())["video"]
