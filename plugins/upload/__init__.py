"""Upload each image to a caller's pre-signed PUT URL (S3, GCS, MinIO...): no cloud credentials on the server.

Each image is PUT with exactly the headers a pre-signed URL expects (Content-Type of the output format,
Content-Length). Connection errors and 5xx are retried with backoff; 4xx are not (an expired URL answers 403
AccessDenied "Request has expired", a header mismatch 403 SignatureDoesNotMatch). Uploads run on the event
loop, all of a request's at once, and every attempt has a deadline for the whole attempt (UPLOAD_TIMEOUT,
and never past the request's own): a target that trickles its answer holds nothing but its own socket. Of
the target's answer, at most MAX_ANSWER_BYTES are read (enough for S3's error document), undecoded; the rest
is never read, and the connection is closed. A failed or late upload never loses the image: its `data[i]`
carries the error and the image as b64_json.

The server PUTs to URLs a caller chose, so it guards against SSRF (see `ssrf.py`): the host is resolved and
every address must be public, redirects are not followed, and the connection goes to the address that was
checked (no DNS rebinding between check and use). Only hosts in UPLOAD_ALLOWED_HOSTS (names or *.domain, on
the scheme's default port unless an entry names a port or :*) skip the address check and may use plain http
(an in-cluster MinIO: `minio.storage.svc:9000`).
"""

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, Field

from plugins.upload.ssrf import Target, UnsafeURL, check_url, resolve_checked
from server.config import MAX_IMAGES, split
from server.errors import bad_request
from server.images import CONTENT_TYPES
from server.plugins import Delivered, Plugin

log = logging.getLogger(__name__)

_XML_FIELD = re.compile(r"<(Code|Message)>([^<]*)</\1>")
MAX_URL_LENGTH = 8192
MAX_ANSWER_BYTES = 4096


class UploadFields(BaseModel):
    upload_urls: list[str] | None = Field(default=None, max_length=MAX_IMAGES)


class UploadStatus(BaseModel):
    """How an image's upload went (`http_status` and `error` as far as they are known)."""

    status: Literal["uploaded", "failed"]
    http_status: int | None = None
    error: str | None = None
    attempts: int


class Uploaded(BaseModel):
    """What an upload adds to its image's data[i]: where the object is, and how its upload went."""

    s3_url: str
    upload: UploadStatus


def object_url(url: str) -> str:
    """The object's URL: the pre-signed URL without its query string."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@dataclass(frozen=True)
class Answer:
    """A target's answer: its status and the first MAX_ANSWER_BYTES of its body."""

    status: int
    head: bytes

    def error(self) -> str:
        fields = dict(_XML_FIELD.findall(self.head.decode("utf-8", "replace")))
        detail = ": ".join(v for v in (fields.get("Code"), fields.get("Message")) if v)
        return f"HTTP {self.status}" + (f" {detail}" if detail else "")


async def read_head(response: httpx.Response, limit: int) -> bytes:
    """At most `limit` bytes of the body as sent (no decompression: a small gzip may hold gigabytes)."""
    head = b""
    async for chunk in response.aiter_raw():
        head += chunk[: limit - len(head)]
        if len(head) >= limit:
            break
    return head


class UploadPlugin(Plugin[list[Target] | None]):
    name = "upload"
    fields = UploadFields

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.allowed = split(self.config.upload_allowed_hosts)
        self.retries = self.config.upload_retries
        self.timeout = self.config.upload_timeout

    def option(self, request) -> list[Target] | None:
        urls = request.upload_urls
        if urls is None:
            return None
        n = request.n or 1
        if len(urls) != n:
            raise bad_request(
                f"'upload_urls' has {len(urls)} URLs for n={n} images; give one per image.", "upload_urls"
            )
        targets = []
        for i, url in enumerate(urls):
            try:
                if len(url) > MAX_URL_LENGTH:
                    raise UnsafeURL(f"is longer than {MAX_URL_LENGTH} characters")
                targets.append(check_url(url, self.allowed))
            except UnsafeURL as exc:
                raise bad_request(f"upload_urls[{i}] {exc}.", f"upload_urls[{i}]", "unsafe_upload_url") from None
        return targets

    async def deliver(
        self, encoded: list[bytes | None], fmt: str, option: list[Target] | None, deadline: float
    ) -> list[Delivered]:
        if option is None:
            return [Delivered(False) for _ in encoded]
        uploads = [
            self._delivered(target, data, CONTENT_TYPES[fmt], deadline) if data is not None else _withheld()
            for target, data in zip(option, encoded, strict=True)
        ]
        return list(await asyncio.gather(*uploads))

    async def _delivered(self, target: Target, data: bytes, content_type: str, deadline: float) -> Delivered:
        status = await self._upload(target, data, content_type, deadline)
        return Delivered(status.status == "uploaded", Uploaded(s3_url=object_url(target.url), upload=status))

    async def _upload(self, target: Target, data: bytes, content_type: str, deadline: float) -> UploadStatus:
        attempts, error, code = 0, "", None
        while attempts <= self.retries:
            if attempts:
                await asyncio.sleep(min(8.0, 0.5 * 2 ** (attempts - 1), max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                error, code = "the request's deadline (REQUEST_TIMEOUT) passed before the upload finished", None
                break
            attempts += 1
            try:
                answer = await self._attempt(target, data, content_type, deadline)
            except UnsafeURL as exc:
                return UploadStatus(status="failed", error=str(exc), attempts=attempts)
            except (httpx.HTTPError, TimeoutError) as exc:
                log.info("upload to %s: attempt %d failed: %r", object_url(target.url), attempts, exc)
                error, code = _transport_error(exc, self.timeout), None
                continue
            code = answer.status
            if 200 <= code < 300:
                return UploadStatus(status="uploaded", http_status=code, attempts=attempts)
            error = answer.error()
            if code < 500:
                break  # 3xx (redirects are not followed) and 4xx: retrying cannot help
        log.warning("upload to %s failed after %d attempts: %s", object_url(target.url), attempts, error)
        return UploadStatus(status="failed", http_status=code, error=error, attempts=attempts)

    async def _attempt(self, target: Target, data: bytes, content_type: str, deadline: float) -> Answer:
        """One PUT, start to answer within UPLOAD_TIMEOUT and the request's deadline (TimeoutError past it)."""
        limit = max(0.0, min(self.timeout, deadline - time.monotonic()))
        return await asyncio.wait_for(self._put(target, data, content_type), limit)

    async def _put(self, target: Target, data: bytes, content_type: str) -> Answer:
        if target.address is not None:
            target = await resolve_checked(target)  # again: the name may point elsewhere by now
        headers = {"Content-Type": content_type, "Content-Length": str(len(data)), "Accept-Encoding": "identity"}
        url, extensions = target.url, {}
        if target.address is not None:
            # connect to the checked address; Host header and TLS name stay the URL's, so the signature holds
            parts = urlsplit(target.url)
            ip = target.address if ":" not in target.address else f"[{target.address}]"
            url = urlunsplit((parts.scheme, f"{ip}:{target.port}", parts.path, parts.query, ""))
            headers["Host"] = parts.netloc
            extensions["sni_hostname"] = target.host
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("PUT", url, content=data, headers=headers, extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                return Answer(response.status_code, await read_head(response, MAX_ANSWER_BYTES))
            finally:
                await response.aclose()


def _transport_error(exc: Exception, timeout: float) -> str:
    """What the caller learns of a failed attempt (the exception itself goes to the log)."""
    if isinstance(exc, TimeoutError):
        return f"the attempt did not finish within UPLOAD_TIMEOUT ({timeout:g}s) or the request's deadline"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect to the upload target"
    return "the connection to the upload target failed before its answer"


async def _withheld() -> Delivered:
    """An image withheld by another plugin: nothing is uploaded, nothing added to its data[i]."""
    return Delivered(False)
