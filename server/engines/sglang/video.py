"""Videos through the SGLang child (Wan 2.2 T2V, I2V, TI2V): one video spec becomes one of SGLang's asynchronous
video jobs, made on the engine thread like any generation.

The routes, the job store and the encoding are the server's (/v1/videos in server/video_api.py), the same as
for the diffusers engine: SGLang only makes the frames. Its job is created with the spec's exact frame count,
size, seed and steps, polled (its `progress` becomes the steps done), its MP4 downloaded and decoded to
frames, and the job and its file deleted: SGLang keeps nothing. Only the documented fields are sent; SGLang
would also take server file paths, which no client chooses here.
"""

import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image

from server.engines.base import Progress
from server.errors import APIError
from server.images import encode_image
from server.spec import GenerationSpec
from server.video_encode import frames_of

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5

# (method, path, limit=bytes of the answer at most, **httpx arguments) -> the child's answer; 503/504 for a child
# that is gone or silent
Request = Callable[..., httpx.Response]


class SGLangVideos:
    def __init__(self, request: Request, raise_for: Callable[[httpx.Response], None], output: Path) -> None:
        self.request = request
        self.raise_for = raise_for
        self.output = output  # SGLang's --output-path: the only folder whose files are deleted here

    def make(self, spec: GenerationSpec, fps: int, guidance: bool, progress: Progress) -> list[Image.Image]:
        """Engine thread: the spec's frames."""
        job = self._create(spec, fps, guidance)
        try:
            self._wait(job["id"], spec.steps, progress)
            limit = spec.frames * spec.width * spec.height * 3  # raw frames: more than any MP4 of them
            response = self.request("GET", f"/v1/videos/{job['id']}/content", limit=limit)
            self.raise_for(response)
            return frames_of(response.content)
        finally:
            self._forget(job)

    def _create(self, spec: GenerationSpec, fps: int, guidance: bool) -> dict:
        fields = {
            "prompt": spec.prompt,
            "size": f"{spec.width}x{spec.height}",
            "num_frames": spec.frames,
            "fps": fps,
            "seed": spec.seeds[0],
            "num_inference_steps": spec.steps,
        }
        if guidance:
            fields["guidance_scale"] = spec.guidance
        if spec.negative_prompt is not None:
            fields["negative_prompt"] = spec.negative_prompt
        if spec.image is None:
            response = self.request("POST", "/v1/videos", json=fields)
        else:
            files = {"input_reference": ("reference.png", encode_image(spec.image, "png", 0), "image/png")}
            response = self.request("POST", "/v1/videos", data={k: str(v) for k, v in fields.items()}, files=files)
        self.raise_for(response)
        return response.json()

    def _wait(self, job_id: str, steps: int, progress: Progress) -> None:
        while not progress.should_stop():
            response = self.request("GET", f"/v1/videos/{job_id}")
            self.raise_for(response)
            job = response.json()
            if progress.step is not None:
                progress.step(round(steps * int(job.get("progress") or 0) / 100), steps)
            if job.get("status") == "completed":
                return
            if job.get("status") == "failed":
                reason = (job.get("error") or {}).get("message") or "no reason given"
                log.error("SGLang failed to make video job %s: %s", job_id, str(reason)[:500])
                message = "SGLang failed to make the video; the server log has its reason."
                raise APIError(500, message, code="engine_error")
            time.sleep(POLL_SECONDS)
        raise APIError(503, "The video was stopped: nobody waits for it any more.", code="stopped")

    def _forget(self, job: dict) -> None:
        """SGLang's record and file of the job; a failure here costs disk, never the video."""
        try:
            self.request("DELETE", f"/v1/videos/{job['id']}")
        except APIError as exc:
            log.warning("could not delete SGLang's video job %s: %s", job["id"], exc.message)
        path = Path(job.get("file_path") or "")
        if path.is_file() and path.resolve().is_relative_to(self.output.resolve()):
            path.unlink(missing_ok=True)
