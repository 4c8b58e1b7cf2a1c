"""A fake engine for the in-process tier: the real app, service, scheduler and plugins around an engine that
paints each image a colour from its seed and prompt at once, and can be held at a gate by the test.

It stands in for the diffusion pipeline only, so that the behaviour around generation (HTTP, validation,
queueing, batching, errors, streaming) is tested in milliseconds and without timing; the end-to-end tier
(tests/e2e) runs the same behaviour through real server processes and the real pipeline.
"""

import tempfile
import threading
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import openai
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.config import from_env
from server.engines.base import Engine, Progress
from server.errors import bad_request
from server.families import CFG, Family, Video
from server.hooks import EngineHooks
from server.spec import GenerationSpec

FAILED_FILE = "/srv/models/flux/transformer/diffusion_pytorch_model.safetensors"  # in an EXPLODE's error


@dataclass
class Call:
    specs: list[GenerationSpec]
    progress: Progress


# A family that makes images and videos, from text or a first image: 8 frames per second in 1 + 4k frames (as
# Wan), sides multiples of 16: "0.5" seconds is 5 frames.
FAKE_VIDEO = Video(fps=8, frame_step=4, default_frames=9, max_frames=17, default_size=(64, 64))
FAKE_FAMILY = Family("fake", (), 8, 3.5, CFG, edits=True, video=FAKE_VIDEO)


class FakeEngine(Engine):
    """Images of one colour per (prompt, seed); video frames too, one colour per (prompt, seed, frame), the
    first frame being the reference image when there is one. `gate`: cleared, every call waits until the test
    sets it, having reported one denoising step; `entered` is released as each call starts. Prompts containing
    EXPLODE fail, as a CUDA error or a lost file would, with an exception that names a server path (FAILED_FILE)."""

    name = "fake-model"

    def __init__(self, can_batch: bool = True, family: Family = FAKE_FAMILY) -> None:
        super().__init__()
        self.can_batch = can_batch
        self.family = family
        self.info = {"engine": "fake"}
        self.calls: list[Call] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)

    def load(self, hooks: EngineHooks) -> None:
        pass

    def defaults(self) -> tuple[int, float]:
        return 8, 3.5

    def check(self, spec: GenerationSpec) -> None:
        if spec.strength is not None and spec.mode == "text2img":
            raise bad_request("'strength' is not supported.", "strength", "unsupported")

    def generate(self, specs: list[GenerationSpec], progress: Progress) -> list[list[Image.Image]]:
        self.calls.append(Call(specs, progress))
        self.entered.release()
        if progress.step is not None:
            progress.step(1, specs[0].steps)
        self.gate.wait(30)
        self._partial_images(specs, progress)
        if any("EXPLODE" in s.prompt for s in specs):
            raise FileNotFoundError(2, "No such file or directory", FAILED_FILE)
        return [_frames(s) if s.frames else [_painted(s, seed) for seed in s.seeds] for s in specs]

    @staticmethod
    def _partial_images(specs: list[GenerationSpec], progress: Progress) -> None:
        """spec.partial_images per image, as the diffusers engine hands them over; BADPREVIEW's cannot render."""
        for step in range(max((s.partial_images for s in specs), default=0)):
            for i, spec in enumerate(specs):
                for j, seed in enumerate(spec.seeds):
                    if step < spec.partial_images and progress.partial_image is not None:
                        progress.partial_image(i, j, partial(_partial_image, spec, seed, step))


def _partial_image(spec: GenerationSpec, seed: int, step: int) -> Image.Image:
    if "BADPREVIEW" in spec.prompt:
        raise RuntimeError("the decoder failed")
    return _painted(spec, seed + 1000 * (step + 1))


def _frames(spec: GenerationSpec) -> list[Image.Image]:
    frames = [_painted(spec, spec.seeds[0] + 7919 * i) for i in range(spec.frames)]
    if spec.image is not None:
        frames[0] = spec.image.resize((spec.width, spec.height))
    return frames


def _painted(spec: GenerationSpec, seed: int) -> Image.Image:
    digest = zlib.crc32(f"{spec.prompt}|{seed}|{spec.loras}".encode())
    colour = (digest & 255, (digest >> 8) & 255, (digest >> 16) & 255)
    return Image.new("RGB", (spec.width, spec.height), colour)


class InProcess:
    """The app around a fake engine, its lifespan running: `http` is an httpx client, `client()` the SDK's."""

    def __init__(self, engine: FakeEngine | None = None, **settings) -> None:
        self.engine = engine or FakeEngine()
        settings.setdefault("video_dir", Path(tempfile.mkdtemp(prefix="image-server-videos-")))  # not the user's cache
        self.settings = from_env(warmup=False, **settings)
        self.app = create_app(self.settings, engine=self.engine)
        self.http = TestClient(self.app, raise_server_exceptions=False)

    def __enter__(self) -> "InProcess":
        self.http.__enter__()
        self.wait_loaded()
        return self

    def __exit__(self, *exc) -> None:
        self.engine.gate.set()
        self.http.__exit__(*exc)

    def wait_loaded(self) -> None:
        for _ in range(500):
            if self.http.get("/ready").status_code == 200:
                return
            threading.Event().wait(0.01)
        raise AssertionError("the in-process app never became ready")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=self.http, **kwargs)

    @property
    def service(self):
        return self.app.state.service

    def metric(self, name: str, labels: str = "") -> float:
        total = 0.0
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


def folders(spool: Path) -> list[Path]:
    """The request folders in a server's spool folder (server/spool.py): none once every request has ended."""
    return [path for path in spool.iterdir() if path.is_dir()]
