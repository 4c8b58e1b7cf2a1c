"""A docker CLI and daemon for the tests that build and run the image (tests/e2e/test_container.py,
tests/e2e/test_cuda_image.py)."""

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.deploy import run


def docker_daemon():
    """Yields the docker CLI, talking to a daemon: the running one, else a dockerd started here and stopped after."""
    cli = docker_cli()
    if run([cli, "info"]).returncode == 0:
        yield cli
        return
    yield from started_daemon(cli)


def docker_cli() -> str:
    """A docker CLI that builds with BuildKit (the Dockerfile's RUN --mount): Docker 23+ with the buildx plugin, or an
    older one with BuildKit built in. The first `docker` on PATH can be neither: this project's machines have a static
    Docker 28 CLI without buildx in /usr/local/bin, besides docker.io's 20.10 in /usr/bin."""
    candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c and Path(c).is_file()]
    for cli in dict.fromkeys(candidates):
        if builds_with_buildkit(cli):
            return cli
    pytest.fail(f"no docker CLI that builds with BuildKit among {candidates}: scripts/setup.sh --test installs one")


def builds_with_buildkit(cli: str) -> bool:
    if run([cli, "buildx", "version"]).returncode == 0:
        return True
    # Only the client part: no daemon may run yet.
    version = subprocess.run([cli, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
    major = re.match(r"(\d+)\.", version.stdout.strip())
    return bool(major) and int(major[1]) < 23


def started_daemon(cli: str):
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).is_file():
        pytest.fail("dockerd is missing: scripts/setup.sh --test installs docker.io")
    log_path = Path(tempfile.mkstemp(prefix="image-server-dockerd-", suffix=".log")[1])
    with log_path.open("wb") as log:
        proc = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while run([cli, "info"]).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "did not answer in 60 s"
                pytest.fail(f"dockerd {state}; its log:\n{log_path.read_text(errors='replace')[-6000:]}")
            time.sleep(0.5)
        yield cli
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)
