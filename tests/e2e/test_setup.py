"""scripts/setup.sh in a copy of the checkout whose .venv python is a stand-in: pip calls are recorded, not run
(everything else goes to this test run's Python, which has torch and the server). Where torch comes from, and a
second run that installs nothing."""

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from bench.harness import free_port
from tests.support.deploy import ROOT, FileServer, run

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = pip ]; then echo "${*:3}" >>"$PIP_LOG"; exit 0; fi
exec PYTHON "$@"
"""
NOT_INSTALLED = "torch==0.0.1"  # a torch the venv lacks, so that setup.sh installs one
has_gpu = Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


@pytest.fixture
def checkout(tmp_path):
    """A checkout with scripts/setup.sh, pyproject.toml and the stand-in .venv; returns it and setup.sh's env."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/setup.sh", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo)
    python = repo / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON.replace("PYTHON", sys.executable))
    python.chmod(0o755)
    env = {**os.environ, "PIP_LOG": str(tmp_path / "pip.log")}
    for name in ("TORCH_SPEC", "TORCH_INDEX_URL", "TORCH_CPU_INDEX"):
        env.pop(name, None)
    return repo, env


def setup(repo: Path, env: dict, *args: str) -> str:
    result = run([repo / "scripts/setup.sh", *args], env=env)
    assert result.returncode == 0, result.stdout
    return result.stdout


def pip_calls(env: dict) -> list[str]:
    log = Path(env["PIP_LOG"])
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(has_gpu, reason="with an NVIDIA GPU, torch comes from the default index")
def test_without_a_gpu_torch_comes_from_pytorchs_cpu_index(checkout):
    repo, env = checkout
    index = repo / "index/whl/cpu/torch"
    index.mkdir(parents=True)
    (index / "index.html").write_text("<a href='torch-2.13.0+cpu.whl'>torch</a>")
    server = FileServer(repo / "index")
    try:
        env.update(TORCH_SPEC=NOT_INSTALLED, TORCH_CPU_INDEX=f"{server.url}/whl/cpu")
        output = setup(repo, env)
    finally:
        server.close()
    assert f"install {NOT_INSTALLED} --index-url {server.url}/whl/cpu" in pip_calls(env)
    assert "torch's CPU build from" in output


@pytest.mark.skipif(has_gpu, reason="with an NVIDIA GPU, torch comes from the default index")
def test_an_unreachable_cpu_index_falls_back_to_the_default_index_at_once(checkout):
    repo, env = checkout
    env.update(TORCH_SPEC=NOT_INSTALLED, TORCH_CPU_INDEX=f"http://127.0.0.1:{free_port()}/whl/cpu")  # nothing there
    started = time.monotonic()
    output = setup(repo, env)
    assert time.monotonic() - started < 10
    assert f"install {NOT_INSTALLED}" in pip_calls(env)  # no --index-url: pip's own configuration
    assert "cannot be reached" in output


@pytest.mark.skipif(has_gpu, reason="with an NVIDIA GPU, torch comes from the default index")
def test_the_real_cpu_index_is_used_or_given_up_quickly(checkout):
    """download.pytorch.org as it is from here: used when reachable, else left within the probe's time limit."""
    repo, env = checkout
    env["TORCH_SPEC"] = NOT_INSTALLED
    started = time.monotonic()
    output = setup(repo, env)
    assert time.monotonic() - started < 25  # the probe: 5 s to connect, 15 s in all, no retries
    assert "torch's CPU build from https://download.pytorch.org/whl/cpu" in output or "cannot be reached" in output


def test_torch_index_url_wins(checkout):
    repo, env = checkout
    env.update(TORCH_SPEC=NOT_INSTALLED, TORCH_INDEX_URL="https://mirror.example/whl/cpu")
    setup(repo, env)
    assert f"install {NOT_INSTALLED} --index-url https://mirror.example/whl/cpu" in pip_calls(env)


def test_a_second_run_installs_nothing_until_pyproject_changes(checkout):
    repo, env = checkout
    first = setup(repo, env)
    assert "[2/3] torch==2.13.0 is installed" in first  # this test run's torch
    assert pip_calls(env) == ["install -e .[bench]"]  # the README's tools: the bench extra (plots)
    started = time.monotonic()
    second = setup(repo, env)
    assert time.monotonic() - started < 5
    assert "has not changed since" in second and len(pip_calls(env)) == 1
    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "\n")
    setup(repo, env)
    assert pip_calls(env)[1:] == ["install -e .[bench]"]


def test_test_extras_cover_a_plain_setup_but_not_the_reverse(checkout):
    repo, env = checkout
    setup(repo, env)
    setup(repo, env, "--test")
    setup(repo, env)
    assert pip_calls(env) == ["install -e .[bench]", "install -e .[test]"]
