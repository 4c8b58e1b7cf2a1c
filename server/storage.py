"""Images returned by URL (response_format=url): files on disk, deleted after a TTL.

Names are 128-bit random tokens, so a URL is a capability: it can be fetched
without the API key, like OpenAI's own image URLs.
"""

import logging
import os
import re
import secrets
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
    def __init__(self, root: Path, ttl: float) -> None:
        self.root = root
        self.ttl = ttl

    def save(self, data: bytes, fmt: str) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{secrets.token_urlsafe(16)}.{fmt}"
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)
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
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - self.ttl
        removed = 0
        for path in self.root.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("deleted %d expired images", removed)
        return removed
