"""The input spool (SPOOL_DIR, INPUT_DISK_MB): callers' bytes over LARGE_BODY wait on disk, never in memory.

A request's large body is written to its own folder as it arrives; a decode process parses it from there and
writes what it holds (a JSON body's data URLs decoded, a form's files) beside it; remote input images are fetched
into it. The server process keeps paths, never the bytes: what it holds of a caller in memory is an edit's
decoded pixels (INPUT_MEMORY_MB). The disk the files take is reserved from INPUT_DISK_MB before it is written, with
each tenant's share, as the memory budget is (server/budget.py); the folder is removed when the request ends,
however it ends.
"""

import asyncio
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from server.budget import InputBudget, Reservation
from server.errors import APIError, bad_request

WRITE_BATCH = 1 << 20  # bytes gathered before a write, which runs in a worker thread
PREFIX = "image-server-spool-"  # of each server's own folder in SPOOL_DIR
LOCK = ".lock"  # held (flock) by the server that owns the folder, as long as it lives


@dataclass(frozen=True)
class SpooledFile:
    """A data URL a decode process decoded from a spooled JSON body: its file, or why it could not be decoded."""

    path: Path | None
    size: int = 0
    error: str = ""
    code: str | None = None


class Spool:
    """Each server's own folder in SPOOL_DIR (servers may share it: one per GPU on a host), made at start and
    removed at exit; at start, the folders of servers that are gone (their lock free) are removed too."""

    def __init__(self, parent: str, budget: InputBudget) -> None:
        self.budget = budget
        self.parent = Path(parent or tempfile.gettempdir())
        self.root = self.parent / PREFIX  # until start makes the server's own
        self._lock = None
        self._count = 0

    def start(self) -> None:
        self.parent.mkdir(parents=True, exist_ok=True)
        for folder in self.parent.glob(PREFIX + "*"):
            _remove_if_orphaned(folder)
        root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.parent))  # private to the server's user
        self._lock = (root / f"{LOCK}.new").open("w")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        Path(self._lock.name).rename(root / LOCK)  # seen only once locked: no sweeper can take it first
        self.root = root

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()

    def request(self, tenant: str) -> "RequestSpool":
        self._count += 1
        return RequestSpool(self.root / str(self._count), self.budget.reservation(tenant))


def _remove_if_orphaned(folder: Path) -> None:
    """A server's folder whose lock no process holds: its server crashed; its requests' files go. One without a
    lock file may be a server starting: left alone. SPOOL_DIR may be the system's temporary folder, where any
    local user makes what they like: only this user's folders are looked into, and the lock is opened without
    blocking or following a link (a FIFO named `.lock` would hold the start for ever)."""
    try:
        if folder.is_symlink() or folder.stat().st_uid != os.getuid():
            return
        with os.fdopen(os.open(folder / LOCK, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)) as lock:
            if not stat.S_ISREG(os.fstat(lock.fileno()).st_mode):
                return
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(folder, ignore_errors=True)
    except OSError:  # no lock file (a server starting), a live server's lock, another user's folder
        return


class RequestSpool:
    """One request's folder (made at its first file) and what its files hold of INPUT_DISK_MB."""

    def __init__(self, folder: Path, disk: Reservation) -> None:
        self.folder = folder
        self.disk = disk
        self.data_urls: dict[str, SpooledFile] = {}  # a spooled JSON body's markers (server/bodies.py)
        self._names = 0

    def path(self, stem: str) -> Path:
        """A new file's path in the folder."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # the server's folder too, if a cleaner took it
        self._names += 1
        return self.folder / f"{stem}.{self._names}"

    async def write(
        self,
        chunks: AsyncIterator[bytes],
        stem: str,
        too_large: tuple[int, Callable[[], APIError]] | None = None,
        reserved: bool = False,
    ) -> Path:
        """Chunks written to a new file as they come, each reserved before it is kept (429 past the budget or the
        tenant's share) unless the caller `reserved` the whole file; `too_large`: a limit in bytes, and the error
        raised past it."""
        path, size = self.path(stem), 0
        limit, error = too_large or (None, None)
        with path.open("wb") as out:
            batch = bytearray()
            async for chunk in chunks:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise error()
                if not reserved:
                    self.disk.take(len(chunk))
                batch += chunk
                if len(batch) >= WRITE_BATCH:
                    await asyncio.to_thread(out.write, batch)
                    batch = bytearray()
            await asyncio.to_thread(out.write, batch)
        return path

    def drop(self, path: Path) -> None:
        """A file no longer needed: removed, and its disk given back."""
        size = path.stat().st_size
        path.unlink()
        self.disk.give(size)

    def data_url(self, marker: str, param: str) -> Path | None:
        """The file of a data URL a decode process decoded (its marker in the parsed body), or None."""
        found = self.data_urls.get(marker)
        if found is None:
            return None
        if found.path is None:
            raise bad_request(f"'{param}' {found.error}", param, found.code)
        return found.path

    def remove(self) -> None:
        """The request has ended: its files go, and their disk is given back."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.disk.release()
