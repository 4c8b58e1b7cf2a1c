"""Images returned by URL (response_format=url): files on disk, deleted after a TTL or, when they would take
more than their quota (IMAGE_DIR_MAX_MB), oldest first.

Names are 128-bit random tokens, so a URL is a capability: it can be fetched without the API key, like
OpenAI's own image URLs.
"""

import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

from starlette.convertors import Convertor, register_url_convertor

log = logging.getLogger(__name__)

_NAME_PATTERN = r"[A-Za-z0-9_-]{22}\.(?:jpeg|png|webp)"
_NAME = re.compile(f"^{_NAME_PATTERN}$")


class ImageNameConvertor(Convertor):
    """Routes only well-formed image names, so /v1/images/generations stays a POST-only route (405 on GET)."""

    regex = _NAME_PATTERN

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("image_name", ImageNameConvertor())


class ImageStore:
    """Thread-safe: the post-processing pool saves, the expiry task deletes."""

    def __init__(self, root: Path, ttl: float, max_bytes: int) -> None:
        self.root = root
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._files: dict[str, tuple[float, int]] = {}  # name -> (mtime, size)
        self._bytes = 0
        self._scanned = False

    def save(self, data: bytes, fmt: str) -> str:
        if len(data) > self.max_bytes:
            raise ValueError(f"an image of {len(data)} bytes is larger than IMAGE_DIR_MAX_MB")
        with self._lock:
            self._scan()
            self._make_room(len(data))
            name = f"{secrets.token_urlsafe(16)}.{fmt}"
            tmp = self.root / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.root / name)
            self._add(name, time.time(), len(data))
        return name

    def path(self, name: str) -> Path | None:
        """The file behind `name`, if the name is one of ours and it has not expired."""
        if not _NAME.match(name):
            return None
        path = self.root / name
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return path if age <= self.ttl else None

    def expire(self) -> int:
        """Delete expired files; returns how many."""
        cutoff = time.time() - self.ttl
        with self._lock:
            self._scan()
            expired = [name for name, (mtime, _) in self._files.items() if mtime < cutoff]
            for name in expired:
                self._remove(name)
        if expired:
            log.info("deleted %d expired images", len(expired))
        return len(expired)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    # -- under the lock ----------------------------------------------------------

    def _scan(self) -> None:
        """Once: the files a previous run left (they count against the quota and expire like the rest)."""
        if self._scanned:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for path in self.root.iterdir():
            if not _NAME.match(path.name):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            self._add(path.name, stat.st_mtime, stat.st_size)
        self._scanned = True

    def _make_room(self, size: int) -> None:
        overflow = self._bytes + size - self.max_bytes
        if overflow <= 0:
            return
        oldest = sorted(self._files.items(), key=lambda item: item[1][0])
        evicted = 0
        for name, (_, file_size) in oldest:
            if overflow <= 0:
                break
            self._remove(name)
            overflow -= file_size
            evicted += 1
        log.warning("image store over IMAGE_DIR_MAX_MB: deleted the %d oldest images early", evicted)

    def _add(self, name: str, mtime: float, size: int) -> None:
        self._files[name] = (mtime, size)
        self._bytes += size

    def _remove(self, name: str) -> None:
        _, size = self._files.pop(name)
        self._bytes -= size
        (self.root / name).unlink(missing_ok=True)
