"""Fixtures of the end-to-end tier: the real server process on loopback (tests/support/server.py), driven by the
official openai package, and a real S3 (moto) on loopback. The in-process tier imports none of this."""

import boto3
import openai
import pytest
from moto.server import ThreadedMotoServer

from bench.harness import free_port
from tests.support.s3 import KEY_ID, REGION, SECRET
from tests.support.server import ServerProcess


@pytest.fixture(scope="session")
def server():
    """The default server: demo model, no auth, no plugins."""
    proc = ServerProcess({"MAX_BATCH": "4"}).start()
    yield proc
    proc.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return server.client(max_retries=0)


@pytest.fixture
def make_server():
    """Start extra servers with their own settings; all stopped at the end of the test."""
    started: list[ServerProcess] = []

    def make(env: dict[str, str] | None = None, wait: bool = True, command: list[str] | None = None):
        proc = ServerProcess(env, command)
        started.append(proc)
        return proc.start(wait)

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def moto():
    """A real S3 implementation (moto's server) on loopback, with a bucket named images."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
    )
    s3.create_bucket(Bucket="images")
    yield endpoint, s3
    server.stop()
