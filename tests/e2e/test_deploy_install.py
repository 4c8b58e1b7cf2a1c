"""The image's install path without Docker: download-packages.sh fills a wheelhouse for the CPU lock (plus one
off-index wheel), docker/install.sh installs from it alone into a fresh venv in the Dockerfile's two steps, and
docker/entrypoint.sh starts the installed server, which answers, and drains and exits 0 on SIGTERM."""

import os
import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.support.deploy import ROOT, WHEELHOUSE, FileServer, make_wheel, run, sha256
from tests.support.images import decode_b64

LOCK = ROOT / "requirements/cpu-py311.txt"
FLASH_ATTN = ROOT / "requirements/flash-attn-cuda.txt"


@pytest.fixture
def venv():
    path = Path(tempfile.mkdtemp(prefix="image-server-venv-"))
    yield path / "venv"
    shutil.rmtree(path, ignore_errors=True)  # about 1.3 GB: not left for pytest's tmp_path retention


@pytest.mark.slow
@pytest.mark.timeout(900)  # one full install of torch and the rest: about 2 minutes on 2 busy cores
def test_offline_install_from_the_wheelhouse_then_serve_through_the_entrypoint(tmp_path, venv):
    releases = tmp_path / "releases"
    releases.mkdir()
    wheel = make_wheel(releases)
    server = FileServer(releases)
    wheels = tmp_path / "wheels-cpu.txt"
    wheels.write_text(f"{server.url}/{urllib.parse.quote(wheel.name)} {sha256(wheel)}\n")
    try:
        target = ["--python-version", "3.11", "--glibc", "2.28"]  # this machine's, not the image's
        result = run(
            [ROOT / "download-packages.sh", "--lock", LOCK, "--wheels", wheels, "--dest", WHEELHOUSE, *target],
            env={**os.environ, "PYTHON": sys.executable},
        )
    finally:
        server.close()
    assert result.returncode == 0, result.stdout

    # The Dockerfile's steps: dependencies (lock + off-index wheels), then the project from a clean source tree.
    source = tmp_path / "src"
    for folder in ("server", "plugins"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    install = [ROOT / "docker/install.sh", "--python", sys.executable, "--venv", venv]
    deps = run([*install, "--wheelhouse", WHEELHOUSE, "--lock", LOCK, "--wheels", wheels])
    assert deps.returncode == 0, deps.stdout
    project = run([*install, "--project", source])
    assert project.returncode == 0, project.stdout
    assert "No broken requirements found" in project.stdout
    check = run([venv / "bin/python", "-c", "import offindex_demo, server, torch; print(torch.__version__)"])
    assert check.returncode == 0 and check.stdout.strip().endswith("+cpu"), check.stdout

    # The image's flash-attn step (WITH_FLASH_ATTN=1) up to the compiler: its sources fetched from PyPI by their
    # pinned URLs and hashes, then built against this venv's torch without build isolation, so every build
    # dependency must be there. SKIP_CUDA_BUILD stands in for nvcc, which this machine lacks.
    fetched = run([ROOT / "download-packages.sh", "--lock", "", "--wheels", FLASH_ATTN, "--dest", WHEELHOUSE])
    assert fetched.returncode == 0, fetched.stdout
    no_nvcc = {**os.environ, "FLASH_ATTENTION_FORCE_BUILD": "TRUE", "FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE"}
    flash = run([*install, "--wheelhouse", WHEELHOUSE, "--wheels", FLASH_ATTN], env=no_nvcc)
    assert flash.returncode == 0 and "No broken requirements found" in flash.stdout, flash.stdout

    # The entrypoint as in the image: state folders that do not exist yet, configuration by environment only.
    state = tmp_path / "state"
    env = {
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "HOME": str(state / "home"),
        "HF_HOME": str(state / "cache/huggingface"),
        "HF_HUB_OFFLINE": "1",
        "TORCH_HOME": str(state / "cache/torch"),
        "TRITON_CACHE_DIR": str(state / "cache/triton"),
        "IMAGE_DIR": str(state / "images"),
    }
    proc = ServerProcess(env, command=[str(ROOT / "docker/entrypoint.sh")]).start()
    try:
        # exec: the process started is the installed server itself, so signals reach it.
        cmdline = Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert str(venv / "bin/image-server").encode() in cmdline and b"serve" in cmdline
        for folder in ("home", "cache/huggingface", "cache/torch", "cache/triton"):
            assert (state / folder).is_dir(), folder
        response = proc.client(max_retries=0).images.generate(prompt="a lighthouse", size="64x64")
        assert decode_b64(response.data[0].b64_json).size == (64, 64)
    finally:
        code = proc.stop()
    assert code == 0, proc.logs()
    assert "draining" in proc.logs()
