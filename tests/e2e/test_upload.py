"""Uploads to pre-signed PUT URLs through the real server: a real S3 (moto) read back, a SigV4-checking endpoint,
expiry, retries, redirects, and the SSRF refusals."""

import io
import time

import openai
import pytest
from PIL import Image

from plugins.upload.ssrf import check_url
from server.config import host_allowed
from tests.support.images import decode_b64
from tests.support.s3 import Verifier, presigned_put

FAST = {"num_inference_steps": 2, "seed": 4}


@pytest.fixture
def verifier():
    v = Verifier()
    v.thread.start()
    yield v
    v.shutdown()


@pytest.fixture(scope="module")
def upload_server():
    from tests.support.server import ServerProcess

    srv = ServerProcess({"PLUGINS": "upload", "UPLOAD_ALLOWED_HOSTS": "127.0.0.1:*", "UPLOAD_RETRIES": "3"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def strict_server():
    """No trusted hosts: every upload URL must be https to a public address."""
    from tests.support.server import ServerProcess

    srv = ServerProcess({"PLUGINS": "upload"}).start()
    yield srv
    srv.stop()


def generate(srv, urls, **kwargs):
    return srv.client(max_retries=0).images.generate(
        prompt="x", size="256x256", n=len(urls), extra_body={**FAST, "upload_urls": urls}, **kwargs
    )


def test_uploads_to_s3_and_the_objects_read_back(upload_server, moto):
    endpoint, s3 = moto
    urls = [presigned_put(endpoint, f"run/{i}.jpeg") for i in range(2)]
    result = generate(upload_server, urls)
    for i, item in enumerate(result.data):
        extra = item.model_extra
        assert extra["upload"]["status"] == "uploaded" and extra["upload"]["attempts"] == 1
        assert extra["s3_url"] == f"{endpoint}/images/run/{i}.jpeg"
        assert item.b64_json is None  # delivered by upload, not in the response
        stored = s3.get_object(Bucket="images", Key=f"run/{i}.jpeg")
        assert stored["ContentType"] == "image/jpeg"
        image = Image.open(io.BytesIO(stored["Body"].read()))
        assert (image.format, image.size) == ("JPEG", (256, 256))


def test_request_arrives_exactly_as_signed(upload_server, verifier):
    urls = [presigned_put(verifier.url, "signed/0.png", content_type="image/png")]
    result = generate(upload_server, urls, output_format="png")
    assert result.data[0].model_extra["upload"]["status"] == "uploaded"
    headers, body = verifier.objects["/images/signed/0.png"]
    assert headers["content-type"] == "image/png"
    assert int(headers["content-length"]) == len(body)
    assert Image.open(io.BytesIO(body)).format == "PNG"


def test_signature_mismatch_is_not_retried_and_keeps_the_image(upload_server, verifier):
    urls = [presigned_put(verifier.url, "mismatch/0.jpeg", content_type="image/png")]  # we send image/jpeg
    item = generate(upload_server, urls).data[0]
    upload = item.model_extra["upload"]
    assert upload["status"] == "failed" and upload["http_status"] == 403 and upload["attempts"] == 1
    assert "SignatureDoesNotMatch" in upload["error"]
    assert decode_b64(item.b64_json).size == (256, 256)


def test_expired_url(upload_server, verifier):
    url = presigned_put(verifier.url, "late/0.jpeg", expires=1)
    time.sleep(2.2)
    item = generate(upload_server, [url]).data[0]
    assert item.model_extra["upload"]["error"] == "HTTP 403 AccessDenied: Request has expired"
    assert item.b64_json


def test_5xx_is_retried_until_it_succeeds(upload_server, verifier):
    verifier.fail_first = 2
    item = generate(upload_server, [presigned_put(verifier.url, "flaky/0.jpeg")]).data[0]
    assert item.model_extra["upload"] == {"status": "uploaded", "http_status": 200, "attempts": 3}
    assert "/images/flaky/0.jpeg" in verifier.objects


def test_redirects_are_not_followed(upload_server, verifier):
    verifier.redirect = True
    item = generate(upload_server, [presigned_put(verifier.url, "moved/0.jpeg")]).data[0]
    upload = item.model_extra["upload"]
    assert upload["status"] == "failed" and upload["http_status"] == 307 and upload["attempts"] == 1
    assert item.b64_json


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/iam",  # cloud metadata
        "https://10.0.0.7/bucket/key",  # private
        "https://127.0.0.1:9000/bucket/key",  # loopback, not allowed on this server
        "https://localhost/bucket/key",  # a name that resolves to loopback
        "https://[::1]/bucket/key",
        "https://[::ffff:192.168.1.1]/bucket/key",  # IPv4-mapped private
        "http://s3.amazonaws.com/bucket/key",  # plain http to an untrusted host
        "ftp://example.com/key",
        "not a url",
    ],
)
def test_ssrf_targets_are_refused(strict_server, url):
    with pytest.raises(openai.BadRequestError) as err:
        strict_server.client(max_retries=0).images.generate(
            prompt="x", size="256x256", extra_body={"upload_urls": [url]}
        )
    assert err.value.body["param"] == "upload_urls[0]"
    assert err.value.body["code"] == "unsafe_upload_url"


def test_one_url_per_image(upload_server):
    with pytest.raises(openai.BadRequestError) as err:
        upload_server.client(max_retries=0).images.generate(
            prompt="x", size="256x256", n=2, extra_body={"upload_urls": ["http://127.0.0.1/a"]}
        )
    assert err.value.body["param"] == "upload_urls"


def test_allowed_host_patterns():
    assert host_allowed(("minio.storage.svc",), "https", "minio.storage.svc", None)
    assert host_allowed(("*.s3.internal",), "https", "bucket.s3.internal", 443)
    assert not host_allowed(("*.s3.internal",), "https", "s3.internal", None)
    assert not host_allowed(("*.s3.internal",), "https", "evil-s3.internal", None)
    assert check_url("http://10.1.2.3:9000/b/k?sig=1", ("10.1.2.3:9000",)).address is None  # trusted: as given
