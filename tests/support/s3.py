"""A loopback PUT endpoint that checks pre-signed SigV4 URLs the way S3 does, recomputing the signature with
botocore (moto's S3 server does not verify signatures). It can also fail the first N requests with a 500, or
answer with a redirect, to exercise the uploader's retry and redirect rules, or trickle its answer a byte at a
time (a slow target must hold nothing but its own upload)."""

import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

KEY_ID, SECRET, REGION = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "us-east-1"


def s3_error(code: str, message: str) -> bytes:
    return f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()


class Verifier(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.objects: dict[str, tuple[dict, bytes]] = {}
        self.attempts: dict[str, int] = {}
        self.fail_first = 0
        self.redirect = False
        self.trickle = 0.0  # seconds between the bytes of a never-ending answer; 0: answer at once
        self.trickling = 0  # uploads being answered a byte at a time right now
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def check(self, method: str, path: str, headers) -> tuple[int, bytes] | None:
        """None when the request is exactly as signed; else S3's status and error body."""
        parts = urlsplit(path)
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        signed_at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        if datetime.now(timezone.utc) > signed_at + timedelta(seconds=int(params["X-Amz-Expires"])):
            return 403, s3_error("AccessDenied", "Request has expired")
        signed = params["X-Amz-SignedHeaders"].split(";")
        if any(h not in headers for h in signed):
            return 403, s3_error("SignatureDoesNotMatch", "a signed header is missing")
        unsigned = urlencode(
            [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "X-Amz-Signature"]
        )
        request = AWSRequest(
            method=method,
            url=f"http://{headers['host']}{parts.path}?{unsigned}",
            headers={h: headers[h] for h in signed},
        )
        request.context["timestamp"] = params["X-Amz-Date"]
        auth = S3SigV4QueryAuth(Credentials(KEY_ID, SECRET), "s3", REGION, expires=int(params["X-Amz-Expires"]))
        expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
        if expected != params["X-Amz-Signature"]:
            return 403, s3_error("SignatureDoesNotMatch", "The request signature we calculated does not match")
        return None


class _Handler(BaseHTTPRequestHandler):
    server: Verifier

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        key = urlsplit(self.path).path
        self.server.attempts[key] = self.server.attempts.get(key, 0) + 1
        if self.server.redirect:
            return self._answer(307, b"", {"Location": "http://169.254.169.254/latest/meta-data/"})
        if self.server.trickle:
            return self._trickle()
        if self.server.attempts[key] <= self.server.fail_first:
            return self._answer(500, s3_error("InternalError", "We encountered an internal error. Please try again."))
        failure = self.server.check("PUT", self.path, {k.lower(): v for k, v in self.headers.items()})
        if failure:
            return self._answer(*failure)
        self.server.objects[key] = ({k.lower(): v for k, v in self.headers.items()}, body)
        self._answer(200, b"")

    def _trickle(self) -> None:
        self.server.trickling += 1
        try:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(self.server.trickle)
        except OSError:
            pass  # the uploader gave up and closed the connection
        finally:
            self.server.trickling -= 1

    def _answer(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def presigned_put(endpoint: str, key: str, content_type: str | None = "image/jpeg", expires: int = 600) -> str:
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )
    params = {"Bucket": "images", "Key": key}
    if content_type:
        params["ContentType"] = content_type
    return s3.generate_presigned_url("put_object", Params=params, ExpiresIn=expires)
