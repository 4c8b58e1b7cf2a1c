"""Video jobs (/v1/videos): one job per request, made by the engine through the one scheduler.

`create` checks the request against the model's video rules (`seconds` -> frames, `size`) and the engine,
takes a place in the queue (429 when it is full) before it fetches or decodes the reference image, stores
the job (`queued`) and answers at once. A task per job then waits for the scheduler, encodes the frames on a
worker thread and stores the files; the job's `progress` follows the denoising steps meanwhile.

Every engine makes video the same way: a spec with `frames` > 0 comes back as its frames (the diffusers
engine runs the pipeline; the SGLang engine asks its child). Jobs belong to the API key that created them.
On SIGTERM queued and running jobs get DRAIN_TIMEOUT to finish, as requests do; what is left fails with
the reason.
"""

import asyncio
import logging
import math
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

from PIL import Image

from server import rules
from server.auth import DEFAULT_TENANT
from server.budget import Reservation
from server.errors import APIError, bad_request
from server.families import Family
from server.images import check_pixels, fitted, inspect_job
from server.inputs import Reader, ref_file
from server.protocol import Video, VideoDeleted, VideoList, VideoRemixRequest, VideoRequest
from server.scheduler import Job, cost
from server.service import ImageService, by_deadline, validate
from server.spec import GenerationSpec
from server.spool import RequestSpool
from server.video_encode import video_files
from server.video_store import FINISHED, VideoJob, VideoParams, VideoStore, new_id

log = logging.getLogger(__name__)

SHUT_DOWN = "The server shut down before this video was finished; create it again."


@dataclass
class VideoCall:
    """POST /v1/videos as the HTTP layer read it."""

    owner: str
    payload: dict
    deadline: float  # the HTTP request's (monotonic): the reference image is read and decoded by then
    spool: RequestSpool  # the request's input files (server/spool.py); its owner removes them
    upload: Path | None = None  # multipart: the input_reference file, in `spool`
    multipart: bool = False  # the payload is a form's text, converted by each field's type
    tenant: str = DEFAULT_TENANT  # who the job is queued as (server/auth.py)


@dataclass
class Running:
    job: Job  # its place in the scheduler
    task: asyncio.Task  # waits for it, then encodes and stores the files


class VideoService:
    def __init__(self, images: ImageService) -> None:
        self.images = images
        self.settings = s = images.settings
        self.store = VideoStore(s.videos_path, s.video_ttl, int(s.video_dir_max_mb * 2**20))
        self.running: dict[str, Running] = {}

    # -- reading ---------------------------------------------------------

    def get(self, owner: str, video_id: str) -> Video:
        return self._view(self._job(owner, video_id))

    def page(self, owner: str, after: str | None, limit: int, order: str) -> VideoList:
        jobs, more = self.store.page(owner, after, limit, order)
        videos = [self._view(job) for job in jobs]
        first, last = (videos[0].id, videos[-1].id) if videos else (None, None)
        return VideoList(data=videos, first_id=first, last_id=last, has_more=more)

    def content(self, owner: str, video_id: str, variant: str) -> Path:
        job = self._job(owner, video_id)
        if job.video.status != "completed":
            raise bad_request(
                f"The video {video_id} is {job.video.status}; its content is there once it has completed.",
                None,
                "video_not_ready",
            )
        return self.store.path(job, variant)

    def _job(self, owner: str, video_id: str) -> VideoJob:
        job = self.store.get(video_id, owner)
        if job is None:
            raise APIError(404, f"No video with id {video_id!r}.", param="video_id", code="not_found")
        return job

    def _view(self, job: VideoJob) -> Video:
        """The stored job, with the live status and progress of one in the scheduler."""
        running = self.running.get(job.video.id)
        if running is None or job.video.status in FINISHED or not running.job.started:
            return job.video
        progress = min(99, int(100 * running.job.progress))  # 100 once its files are stored
        return job.video.model_copy(update={"status": "in_progress", "progress": progress})

    # -- creating --------------------------------------------------------

    async def create(self, call: VideoCall) -> Video:
        request = validate(VideoRequest, call.payload, call.multipart)
        family = self._rules(request.input_reference is not None or call.upload is not None)
        video, s = family.video, self.settings
        width, height = rules.video_size(request.size, family, s)
        frames = rules.video_frames(request.seconds, video)
        params = VideoParams(
            width=width,
            height=height,
            frames=frames,
            fps=video.fps,
            steps=rules.steps(request.num_inference_steps, "high", self.images.default_steps, {}, s.max_steps),
            guidance=self.images.default_guidance if request.guidance_scale is None else request.guidance_scale,
            seed=rules.seeds(request.seed, 1)[0],
            negative_prompt=request.negative_prompt,
            reference=request.input_reference is not None or call.upload is not None,
        )
        seconds = request.seconds or rules.seconds_text(Fraction(frames - 1, video.fps))

        async def reference() -> Path | None:
            if call.upload is not None:
                return call.upload
            if request.input_reference is None:
                return None
            images = self.images
            reader = Reader(s, call.deadline, call.spool, images.decoders, images.off_loop)
            return await ref_file(request.input_reference, "input_reference", reader)

        return await self._start(call.owner, call.tenant, request.prompt, params, seconds, reference, call.deadline)

    async def remix(
        self, owner: str, tenant: str, video_id: str, payload: dict, deadline: float, spool: RequestSpool
    ) -> Video:
        """The source's video again (size, length, seed, steps, reference image) from a new prompt."""
        source = self._job(owner, video_id)
        request = validate(VideoRemixRequest, payload)
        if source.video.status != "completed":
            raise bad_request(f"Only a completed video can be remixed; {video_id} is {source.video.status}.")
        self._rules(source.params.reference)

        async def reference() -> Path | None:
            return await self._copied_reference(source, spool)

        return await self._start(
            owner, tenant, request.prompt, source.params, source.video.seconds, reference, deadline, video_id
        )

    async def _copied_reference(self, source: VideoJob, spool: RequestSpool) -> Path | None:
        """The source's reference image copied into the request's spool: the source may be deleted meanwhile."""
        stored = self.store.reference(source)
        if stored is None:
            return None
        try:
            spool.disk.take(stored.stat().st_size)
            path = spool.path("reference")
            await asyncio.to_thread(shutil.copyfile, stored, path)
        except FileNotFoundError:
            video_id = source.video.id
            raise APIError(404, f"No video with id {video_id!r}.", param="video_id", code="not_found") from None
        return path

    def _rules(self, image_to_video: bool) -> Family:
        family = self.images.engine.family
        if family.video is None:
            raise bad_request(f"This model ({self.images.engine.name}) makes no video.", "model", "unsupported")
        if image_to_video and not family.edits:
            raise bad_request("This model makes video from text only.", "input_reference", "unsupported")
        if not image_to_video and not family.text2img:
            raise bad_request(
                "This model makes video from an image: send 'input_reference'.",
                "input_reference",
                "missing_required_parameter",
            )
        return family

    async def _start(
        self,
        owner: str,
        tenant: str,
        prompt: str,
        params: VideoParams,
        seconds: str,
        reference: Callable[[], Awaitable[Path | None]],
        deadline: float,
        remixed_from: str | None = None,
    ) -> Video:
        """A place in the queue first (429 fetches and decodes nothing), then the reference, the job, the task. The
        reference's pixels hold their part of the input memory until the job ends."""
        spec = _spec(prompt, params)
        self.images.engine.check(spec)
        admission = self.images.scheduler.admit(tenant, cost(spec))
        pixels = self.images.memory.reservation(tenant)
        try:
            path = await reference()
            image = await self._decoded(path, deadline, pixels) if path is not None else None
            job = _new_job(owner, prompt, params, seconds, self.images.engine.name, remixed_from)
            await asyncio.to_thread(self.store.add, job, path)
            try:
                queued = admission.submit(replace(spec, image=image))
            except APIError:
                await asyncio.to_thread(self.store.delete, job.video.id)
                raise
        except BaseException:
            pixels.release()
            raise
        finally:
            admission.release()
        task = asyncio.create_task(self._run(job.video.id, queued, params.fps), name=f"video {job.video.id}")
        task.add_done_callback(lambda _: pixels.release())  # however the job ends, even cancelled before it began
        self.running[job.video.id] = Running(queued, task)
        return job.video

    async def _decoded(self, path: Path, deadline: float, pixels: Reservation) -> Image.Image:
        """The reference image's structure checked against the limits in a decode process, its pixels reserved,
        then decoded there."""
        job = inspect_job(path, "input_reference", self.settings.max_jpeg_scans)
        image = await self.images.decoders.run(job, deadline, "'input_reference'", "input_reference")
        check_pixels([image], self.settings.max_input_pixels)
        pixels.take(3 * math.prod(fitted(image.width, image.height, self.settings.max_pixels)))
        return await self.images.decode(image, False, deadline)

    async def _run(self, video_id: str, job: Job, fps: int) -> None:
        try:
            deadline, timeout = time.monotonic() + self.settings.video_timeout, self.settings.video_timeout
            frames = await by_deadline(self.images.scheduler.wait(job), deadline, timeout)
            files = await asyncio.to_thread(video_files, frames, fps)
            await asyncio.to_thread(self.store.complete, video_id, files)
        except APIError as exc:
            await asyncio.to_thread(self.store.fail, video_id, exc.code or "error", exc.message)
        except Exception:
            log.exception("video %s failed after generation", video_id)
            message = "The server had an error while encoding this video."
            await asyncio.to_thread(self.store.fail, video_id, "internal_error", message)
        finally:
            self.running.pop(video_id, None)

    # -- deleting and stopping -------------------------------------------

    async def delete(self, owner: str, video_id: str) -> VideoDeleted:
        """A queued or running job is cancelled too (a running batch stops at its next step)."""
        self._job(owner, video_id)
        running = self.running.pop(video_id, None)
        if running is not None:
            self.images.scheduler.cancel(running.job)
            running.task.cancel()
        await asyncio.to_thread(self.store.delete, video_id)
        return VideoDeleted(id=video_id)

    async def drain(self, deadline: float) -> None:
        """After the scheduler has drained: the jobs still being encoded get until `deadline`; the rest fail."""
        tasks = [running.task for running in self.running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        for video_id, running in list(self.running.items()):
            running.task.cancel()
            self.store.fail(video_id, "shutting_down", SHUT_DOWN)
        if tasks:
            log.info("video jobs at shutdown: %d finished or failed", len(tasks))


def _spec(prompt: str, params: VideoParams) -> GenerationSpec:
    return GenerationSpec(
        prompt=prompt,
        n=1,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance=params.guidance,
        seeds=[params.seed],
        negative_prompt=params.negative_prompt,
        mode="img2img" if params.reference else "text2img",
        frames=params.frames,
    )


def _new_job(
    owner: str, prompt: str, params: VideoParams, seconds: str, model: str, remixed_from: str | None
) -> VideoJob:
    now = time.time()
    video = Video(
        id=new_id(),
        model=model,
        status="queued",
        progress=0,
        created_at=int(now),
        prompt=prompt,
        remixed_from_video_id=remixed_from,
        seconds=seconds,
        size=f"{params.width}x{params.height}",
    )
    return VideoJob(video=video, owner=owner, params=params, created=now)
