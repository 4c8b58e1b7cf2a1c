"""Video jobs on disk: one folder per job under VIDEO_DIR, so that a restart loses no finished video.

A folder holds `job.json` (the job as OpenAI shows it, its owner and what was asked of the engine), the
reference image of an image-to-video job, and once finished `video.mp4`, `thumbnail.webp` and
`spritesheet.jpg`. A job expires VIDEO_TTL seconds after it finished (its `expires_at`); when the files would
take more than VIDEO_DIR_MAX_MB, the oldest finished jobs are deleted first, as URL images are (storage.py).

A job that was queued or running when the process stopped without draining (a crash, SIGKILL) cannot go on:
the next start marks it failed with the reason. Thread-safe: the event loop reads, worker threads write files.
"""

import logging
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ValidationError

from server.errors import bad_request
from server.protocol import Video, VideoError

log = logging.getLogger(__name__)

_ID = re.compile(r"^video_[0-9a-f]{48}$")
ASSETS = {  # variant -> (file, media type), as OpenAI's download_content serves them
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
}
REFERENCE = "reference.png"
FINISHED = ("completed", "failed")


class VideoParams(BaseModel):
    """What the engine is asked to make; a remix asks the same with another prompt."""

    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance: float
    seed: int
    negative_prompt: str | None = None
    reference: bool = False  # image-to-video: reference.png is the first frame's guide


class VideoJob(BaseModel):
    video: Video
    owner: str  # a digest of the API key that created it ("" without API keys)
    params: VideoParams
    created: float  # time.time() at creation: orders jobs created within one second
    bytes: int = 0  # its files on disk


def new_id() -> str:
    return f"video_{secrets.token_hex(24)}"


class VideoStore:
    def __init__(self, root: Path, ttl: float, max_bytes: int) -> None:
        self.root = root
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._jobs: dict[str, VideoJob] = {}

    # -- startup ---------------------------------------------------------

    def load(self) -> int:
        """The jobs a previous run left; those it left unfinished are failed. Returns how many were loaded."""
        self.root.mkdir(parents=True, exist_ok=True)
        jobs = [job for folder in sorted(self.root.iterdir()) if (job := self._read(folder)) is not None]
        with self._lock:
            for job in sorted(jobs, key=lambda j: j.created):
                self._jobs[job.video.id] = job
        for job in jobs:
            if job.video.status not in FINISHED:
                self.fail(job.video.id, "server_restarted", "The server restarted before this video was finished.")
        return len(jobs)

    def _read(self, folder: Path) -> VideoJob | None:
        if not _ID.match(folder.name):
            return None
        try:
            return VideoJob.model_validate_json((folder / "job.json").read_bytes())
        except (OSError, ValidationError) as exc:
            log.warning("ignoring the video folder %s: %s", folder.name, exc)
            return None

    # -- reading (event loop) --------------------------------------------

    def get(self, video_id: str, owner: str) -> VideoJob | None:
        """The job, if `owner` created it (another key's job is as absent as one that never was)."""
        job = self._jobs.get(video_id)
        return job if job is not None and job.owner == owner else None

    def page(self, owner: str, after: str | None, limit: int, order: str) -> tuple[list[VideoJob], bool]:
        """`owner`'s jobs, oldest first for `asc`, after the job `after`; and whether more follow."""
        with self._lock:
            mine = [job for job in self._jobs.values() if job.owner == owner]
        if order == "desc":
            mine.reverse()
        if after is not None:
            ids = [job.video.id for job in mine]
            if after not in ids:
                raise bad_request(f"Invalid value for 'after': there is no video {after!r}.", "after")
            mine = mine[ids.index(after) + 1 :]
        return mine[:limit], len(mine) > limit

    def path(self, job: VideoJob, variant: str) -> Path:
        return self.root / job.video.id / ASSETS[variant][0]

    @property
    def used_bytes(self) -> int:
        return sum(job.bytes for job in self._jobs.values())

    # -- writing (worker threads) ----------------------------------------

    def add(self, job: VideoJob, reference: Path | None) -> None:
        """A new job, its reference image (a request's file) copied beside it."""
        folder = self.root / job.video.id
        folder.mkdir(parents=True)
        if reference is not None:
            try:
                shutil.copyfile(reference, folder / REFERENCE)
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            job.bytes = reference.stat().st_size
        with self._lock:
            self._jobs[job.video.id] = job
            self._write(job)

    def reference(self, job: VideoJob) -> Path | None:
        return self.root / job.video.id / REFERENCE if job.params.reference else None

    def complete(self, video_id: str, files: dict[str, bytes]) -> bool:
        """The finished job's files (by variant); False when the job was deleted meanwhile or cannot fit."""
        size = sum(len(data) for data in files.values())
        if size > self.max_bytes:
            self.fail(video_id, "video_too_large", f"The video's {size} bytes are more than VIDEO_DIR_MAX_MB.")
            return False
        folder = self.root / video_id
        try:
            for variant, data in files.items():
                _write_atomically(folder / ASSETS[variant][0], data)
        except FileNotFoundError:  # the folder went with the job, deleted while it was encoded
            return False
        with self._lock:
            job = self._jobs.get(video_id)
            if job is None:  # deleted while its files were written
                shutil.rmtree(folder, ignore_errors=True)
                return False
            self._make_room(size, keep=video_id)
            now = int(time.time())
            job.bytes += size
            job.video = job.video.model_copy(
                update={"status": "completed", "progress": 100, "completed_at": now, "expires_at": now + self.ttl}
            )
            self._write(job)
        return True

    def fail(self, video_id: str, code: str, message: str) -> None:
        with self._lock:
            job = self._jobs.get(video_id)
            if job is None:
                return
            job.video = job.video.model_copy(
                update={
                    "status": "failed",
                    "error": VideoError(code=code, message=message),
                    "expires_at": int(time.time() + self.ttl),
                }
            )
            self._write(job)

    def delete(self, video_id: str) -> None:
        with self._lock:
            self._remove(video_id)

    def expire(self) -> int:
        """Delete the jobs past their `expires_at`; returns how many."""
        now = time.time()
        with self._lock:
            expired = [i for i, job in self._jobs.items() if job.video.expires_at and job.video.expires_at < now]
            for video_id in expired:
                self._remove(video_id)
        if expired:
            log.info("deleted %d expired video jobs", len(expired))
        return len(expired)

    # -- under the lock --------------------------------------------------

    def _write(self, job: VideoJob) -> None:
        _write_atomically(self.root / job.video.id / "job.json", job.model_dump_json().encode())

    def _make_room(self, size: int, keep: str) -> None:
        overflow = self.used_bytes + size - self.max_bytes
        finished = [job for job in self._jobs.values() if job.video.status in FINISHED and job.video.id != keep]
        evicted = 0
        for job in sorted(finished, key=lambda j: j.created):
            if overflow <= 0:
                break
            overflow -= job.bytes
            self._remove(job.video.id)
            evicted += 1
        if evicted:
            log.warning("video store over VIDEO_DIR_MAX_MB: deleted the %d oldest finished jobs early", evicted)

    def _remove(self, video_id: str) -> None:
        self._jobs.pop(video_id, None)
        shutil.rmtree(self.root / video_id, ignore_errors=True)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
