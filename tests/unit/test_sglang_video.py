"""server/engines/sglang/video.py: a video spec made through SGLang's asynchronous /v1/videos jobs.

SGLang's Wan pipelines need a GPU and the models' weights, so here a stand-in answers as SGLang 0.5.23's job API
does (create, poll, content, delete); the MP4 it serves is a real one. tests/e2e/test_sglang.py runs the real
child for images.
"""

import httpx
import pytest
from PIL import Image

from server.config import from_env
from server.engines.base import Progress
from server.engines.sglang import video
from server.engines.sglang.engine import SGLangEngine
from server.errors import APIError
from server.families import FAMILIES
from server.spec import GenerationSpec
from server.video_encode import mp4


class FakeSGLang:
    """SGLang's video job API: each job runs for `polls` polls, then completes (or fails with `failure`)."""

    def __init__(self, output, polls: int = 3, failure: str = "") -> None:
        self.output = output
        self.polls = polls
        self.failure = failure
        self.sent: list[tuple[str, str, dict]] = []
        self.jobs: dict[str, dict] = {}

    def __call__(self, method: str, path: str, **kwargs) -> httpx.Response:
        self.sent.append((method, path, kwargs))
        if method == "POST":
            return self._create(kwargs)
        job_id = path.split("/")[3]
        job = self.jobs[job_id]
        if method == "DELETE":
            return _answer(self.jobs.pop(job_id))
        if path.endswith("/content"):
            return httpx.Response(200, content=job["_mp4"], request=httpx.Request(method, "http://sglang" + path))
        job["_polled"] += 1
        done = job["_polled"] >= self.polls
        job.update(progress=100 * job["_polled"] // self.polls, status="in_progress")
        if done:
            job["status"] = "failed" if self.failure else "completed"
            job["error"] = {"message": self.failure} if self.failure else None
        return _answer(job)

    def _create(self, kwargs) -> httpx.Response:
        fields = kwargs.get("json") or kwargs["data"]
        width, height = (int(side) for side in fields["size"].split("x"))
        frames = [Image.new("RGB", (width, height), (10 * i, 0, 0)) for i in range(int(fields["num_frames"]))]
        path = self.output / f"{len(self.jobs)}.mp4"
        path.write_bytes(mp4(frames, int(fields["fps"])))
        job = {"id": f"job{len(self.jobs)}", "status": "queued", "progress": 0, "file_path": str(path)}
        self.jobs[job["id"]] = {**job, "_polled": 0, "_mp4": path.read_bytes()}
        return _answer(job)


def _answer(job: dict) -> httpx.Response:
    public = {k: v for k, v in job.items() if not k.startswith("_")}
    return httpx.Response(200, json=public, request=httpx.Request("GET", "http://sglang/v1/videos"))


def _raise_for(response: httpx.Response) -> None:
    assert response.status_code == 200


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(video, "POLL_SECONDS", 0)


def spec(**changes) -> GenerationSpec:
    fields = dict(prompt="a wave", n=1, width=64, height=48, steps=8, guidance=4.0, seeds=[5], frames=9)
    return GenerationSpec(**{**fields, **changes})


def test_the_frames_come_back_and_sglang_keeps_nothing(tmp_path):
    sglang = FakeSGLang(tmp_path)
    steps = []
    progress = Progress(step=lambda done, total: steps.append((done, total)))
    frames = video.SGLangVideos(sglang, _raise_for, tmp_path).make(spec(), 16, True, progress)
    assert len(frames) == 9 and frames[0].size == (64, 48)
    method, path, sent = sglang.sent[0]
    assert (method, path) == ("POST", "/v1/videos")
    assert sent["json"] == {
        "prompt": "a wave", "size": "64x48", "num_frames": 9, "fps": 16, "seed": 5, "num_inference_steps": 8,
        "guidance_scale": 4.0,
    }  # fmt: skip
    assert steps == [(3, 8), (5, 8), (8, 8)]  # SGLang's progress 33, 66, 100 as steps
    assert sglang.sent[-1][0] == "DELETE" and not sglang.jobs and not list(tmp_path.iterdir())


def test_a_reference_image_goes_as_a_file(tmp_path):
    sglang = FakeSGLang(tmp_path)
    reference = Image.new("RGB", (64, 48), (0, 200, 0))
    video.SGLangVideos(sglang, _raise_for, tmp_path).make(spec(image=reference), 16, False, Progress())
    sent = sglang.sent[0][2]
    assert sent["files"]["input_reference"][1].startswith(b"\x89PNG")
    assert "guidance_scale" not in sent["data"] and sent["data"]["num_frames"] == "9"


def test_a_failed_sglang_job_fails_with_its_reason_in_the_log_and_is_deleted(tmp_path, caplog):
    """SGLang's reason may name its paths and hold a traceback: the caller learns that it failed (rule 7)."""
    sglang = FakeSGLang(tmp_path, failure="CUDA out of memory in /opt/sglang/runtime/worker.py:42")
    with pytest.raises(APIError) as err:
        video.SGLangVideos(sglang, _raise_for, tmp_path).make(spec(), 16, True, Progress())
    assert err.value.status == 500 and "/opt/sglang" not in err.value.message
    assert "CUDA out of memory in /opt/sglang" in caplog.text
    assert not sglang.jobs and not list(tmp_path.iterdir())


def test_a_job_nobody_waits_for_stops_polling(tmp_path):
    sglang = FakeSGLang(tmp_path, polls=1000)
    stop = Progress(should_stop=lambda: len(sglang.sent) > 3)
    with pytest.raises(APIError) as err:
        video.SGLangVideos(sglang, _raise_for, tmp_path).make(spec(), 16, True, stop)
    assert err.value.code == "stopped" and not sglang.jobs


def test_files_outside_sglangs_output_folder_are_never_deleted(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sglang = FakeSGLang(elsewhere)
    output = tmp_path / "output"
    output.mkdir()
    video.SGLangVideos(sglang, _raise_for, output).make(spec(), 16, True, Progress())
    assert len(list(elsewhere.iterdir())) == 1


def test_the_engine_sends_video_specs_to_its_child_only_where_sglang_serves_video():
    engine = SGLangEngine(from_env(engine="sglang"))
    engine.family = next(family for family in FAMILIES if family.name == "Wan2.2-T2V")
    engine.tasks = {"T2I"}  # a server whose reported tasks have no video
    with pytest.raises(APIError) as err:
        engine.check(spec())
    assert (err.value.param, err.value.code) == ("model", "unsupported")
    engine.tasks = {"T2V"}
    engine.check(spec())
    made = []

    class Videos:
        def make(self, *args):
            made.append(args)
            return ["frame"]

    engine.videos = Videos()
    assert engine.generate([spec()], Progress()) == [["frame"]]
    assert made[0][1:3] == (16, True)  # Wan 2.2 A14B's frame rate; its guidance is a CFG weight
