"""Shared fixtures: the real server process on loopback (tests/e2e), driven by the official openai package,
and a real S3 (moto) on loopback."""

import os
import sys
import tempfile
from pathlib import Path

import boto3
import openai
import pytest
from moto.server import ThreadedMotoServer

from bench import harness
from bench.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# One demo model for the whole run: built by the first server, reused by the others.
CACHE_DIR = Path(os.environ.get("IMAGE_SERVER_TEST_CACHE", Path(tempfile.gettempdir()) / "image-server-test-cache"))


class ServerProcess(harness.ServerProcess):
    """The bench's launcher with the tests' defaults: the demo model from the shared cache, one torch thread."""

    def __init__(self, env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        defaults = {"MODEL_PATH": "demo", "CACHE_DIR": str(CACHE_DIR), "TORCH_THREADS": "1"}
        super().__init__({**defaults, **(env or {})}, command, ready_timeout=120)


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
    from tests.support.s3 import KEY_ID, REGION, SECRET

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
