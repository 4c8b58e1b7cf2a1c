"""Upload each image to a caller's pre-signed PUT URL (S3, GCS, MinIO...): no cloud credentials on the server.

Each image is PUT with exactly the headers a pre-signed URL expects
(Content-Type of the output format, Content-Length). Connection errors and
5xx are retried with backoff; 4xx are not (an expired URL answers 403
AccessDenied "Request has expired", a header mismatch 403
SignatureDoesNotMatch). A failed upload never loses the image: its `data[i]`
carries the error and the image as b64_json.

The server PUTs to URLs a caller chose, so it guards against SSRF: the host
is resolved and loopback, private, link-local, reserved and cloud-metadata
addresses are refused, redirects are not followed, and the connection goes to
the address that was checked (no DNS rebinding between check and use). Only
hosts in UPLOAD_ALLOWED_HOSTS (names or *.domain) skip the address check and
may use plain http (an in-cluster MinIO).
"""

import ipaddress
import logging
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, Field

from server.errors import bad_request
from server.images import CONTENT_TYPES
from server.plugins import Plugin

log = logging.getLogger(__name__)

_XML_FIELD = re.compile(r"<(Code|Message)>([^<]*)</\1>")


class UploadFields(BaseModel):
    upload_urls: list[str] | None = Field(default=None, max_length=10)


class UnsafeURL(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    url: str  # as given, pre-signed query included
    host: str
    port: int
    address: str | None  # the checked IP to connect to; None for trusted hosts (resolved normally)


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in (p.lower() for p in patterns):
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allowed: tuple[str, ...]) -> Target:
    """Refuse what an SSRF would use; returns where to connect."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        raise UnsafeURL("must be an https URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeURL("has an invalid port") from None
    if host_allowed(host, allowed):
        return Target(url, host, port, None)
    if parts.scheme != "https":
        raise UnsafeURL(f"must use https ({host} is not in UPLOAD_ALLOWED_HOSTS)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"host {host} does not resolve ({exc.strerror})") from None
    addresses = [info[4][0] for info in infos]
    private = [a for a in addresses if not _public(a)]
    if private:
        raise UnsafeURL(f"host {host} resolves to a non-public address ({private[0]}); refused")
    return Target(url, host, port, addresses[0])


def object_url(url: str) -> str:
    """The object's URL: the pre-signed URL without its query string."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _s3_error(response: httpx.Response) -> str:
    fields = dict(_XML_FIELD.findall(response.text[:4096]))
    detail = ": ".join(v for v in (fields.get("Code"), fields.get("Message")) if v)
    return f"HTTP {response.status_code}" + (f" {detail}" if detail else "")


class UploadPlugin(Plugin):
    name = "upload"
    fields = UploadFields

    def __init__(self, settings, engine) -> None:
        super().__init__(settings, engine)
        self.allowed = settings.upload_hosts
        self.retries = settings.upload_retries
        self.timeout = settings.upload_timeout
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="upload")

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
                targets.append(check_url(url, self.allowed))
            except UnsafeURL as exc:
                raise bad_request(f"upload_urls[{i}] {exc}.", f"upload_urls[{i}]", "unsafe_upload_url") from None
        return targets

    def deliver(self, encoded: list[bytes | None], fmt: str, option, items: list[dict]) -> list[bool]:
        if option is None:
            return [False] * len(encoded)
        jobs = [
            self._pool.submit(self._upload, target, data, CONTENT_TYPES[fmt]) if data is not None else None
            for target, data in zip(option, encoded, strict=True)
        ]
        delivered = []
        for target, job, item in zip(option, jobs, items, strict=True):
            if job is None:  # withheld by another plugin: nothing to upload
                delivered.append(False)
                continue
            status = job.result()
            item["s3_url"] = object_url(target.url)
            item["upload"] = status
            delivered.append(status["status"] == "uploaded")
        return delivered

    def _upload(self, target: Target, data: bytes, content_type: str) -> dict:
        attempts, error, code = 0, "", None
        while attempts <= self.retries:
            if attempts:
                time.sleep(min(8.0, 0.5 * 2 ** (attempts - 1)))
            attempts += 1
            try:
                target = target if target.address is None else check_url(target.url, self.allowed)  # re-check
                response = self._put(target, data, content_type)
            except UnsafeURL as exc:
                return {"status": "failed", "error": str(exc), "attempts": attempts}
            except httpx.HTTPError as exc:
                error, code = f"{type(exc).__name__}: {exc}", None
                continue
            code = response.status_code
            if 200 <= code < 300:
                return {"status": "uploaded", "http_status": code, "attempts": attempts}
            error = _s3_error(response)
            if code < 500:
                break  # 3xx (redirects are not followed) and 4xx: retrying cannot help
        log.warning("upload to %s failed after %d attempts: %s", object_url(target.url), attempts, error)
        return {"status": "failed", "http_status": code, "error": error, "attempts": attempts}

    def _put(self, target: Target, data: bytes, content_type: str) -> httpx.Response:
        headers = {"Content-Type": content_type, "Content-Length": str(len(data))}
        url, extensions = target.url, {}
        if target.address is not None:
            # connect to the checked address; Host header and TLS name stay the URL's, so the signature holds
            parts = urlsplit(target.url)
            ip = target.address if ":" not in target.address else f"[{target.address}]"
            url = urlunsplit((parts.scheme, f"{ip}:{target.port}", parts.path, parts.query, ""))
            headers["Host"] = parts.netloc
            extensions["sni_hostname"] = target.host
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            request = client.build_request("PUT", url, content=data, headers=headers, extensions=extensions)
            return client.send(request)
