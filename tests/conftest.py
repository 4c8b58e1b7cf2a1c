"""Shared fixtures: the real server process on loopback, driven by the official openai package."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import httpx
import openai
import pytest
from moto.server import ThreadedMotoServer

from bench.harness import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# One demo model for the whole run: built by the first server, reused by the others.
CACHE_DIR = Path(os.environ.get("IMAGE_SERVER_TEST_CACHE", Path(tempfile.gettempdir()) / "image-server-test-cache"))


class ServerProcess:
    """`image-server serve` in a child process, configured by environment like the container."""

    def __init__(self, env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="image-server-", suffix=".log")[1])
        self.env = {
            **os.environ,
            "MODEL_PATH": "demo",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "CACHE_DIR": str(CACHE_DIR),
            "IMAGE_DIR": tempfile.mkdtemp(prefix="image-server-images-"),
            "TORCH_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.command = command or [str(BIN / "image-server"), "serve"]
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "ServerProcess":
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        wait_ready(self.url, self.proc, timeout, self.logs)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of the samples of `name` (optionally those whose label text contains `labels`)."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0


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
    from tests.s3_verifier import KEY_ID, REGION, SECRET

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
