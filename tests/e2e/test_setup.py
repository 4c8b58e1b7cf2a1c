"""scripts/setup.sh in a copy of the checkout whose .venv python is a stand-in: pip calls are recorded, not run
(everything else goes to this test run's Python, which has torch and the server). Where torch comes from, a
second run that installs nothing, what each tier installs (system packages: apt-get and dpkg are stand-ins too),
and which tier scripts/test.sh sets up."""

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


def test_a_unit_setup_installs_the_unit_extra_and_is_covered_by_a_test_setup(checkout):
    repo, env = checkout
    setup(repo, env, "--unit")
    setup(repo, env, "--unit")
    setup(repo, env, "--test")
    setup(repo, env, "--unit")
    assert pip_calls(env) == ["install -e .[unit]", "install -e .[test]"]


def test_a_plain_setup_after_a_unit_one_adds_the_bench_extra_once(checkout):
    repo, env = checkout
    setup(repo, env, "--unit")
    setup(repo, env)
    setup(repo, env, "--unit")
    setup(repo, env)
    assert pip_calls(env) == ["install -e .[unit]", "install -e .[bench]"]


def test_an_unknown_option_is_refused(checkout):
    repo, env = checkout
    result = run([repo / "scripts/setup.sh", "--tests"], env=env)
    assert result.returncode == 2 and "usage: scripts/setup.sh [--unit | --test]" in result.stdout


def fake_apt(tmp_path: Path, env: dict) -> Path:
    """apt-get and dpkg stand-ins on PATH: no package is installed, and apt-get records what it is asked for."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg").write_text("#!/usr/bin/env bash\nexit 1\n")
    (bin_dir / "apt-get").write_text('#!/usr/bin/env bash\necho "$*" >>"$APT_LOG"\n')
    (bin_dir / "sudo").write_text('#!/usr/bin/env bash\nexec "$@"\n')
    for name in ("dpkg", "apt-get", "sudo"):
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "apt.log"
    env.update(PATH=f"{bin_dir}:{env['PATH']}", APT_LOG=str(log))
    return log


@pytest.mark.parametrize(
    ("option", "packages"),
    [
        ("", {"python3-venv", "curl"}),
        ("--unit", {"python3-venv", "curl"}),  # no test-only system package
        ("--test", {"python3-venv", "curl", "nginx", "shellcheck", "mmdebstrap", "pigz"}),
    ],
)
def test_system_packages_of_each_tier(checkout, tmp_path, option, packages):
    repo, env = checkout
    log = fake_apt(tmp_path, env)
    setup(repo, env, *filter(None, [option]))
    installs = [line.split() for line in log.read_text().splitlines() if line.startswith("install")]
    assert len(installs) == 1
    asked = {word for word in installs[0][1:] if not word.startswith("-")} - {"docker.io"}  # where no dockerd
    assert asked == packages


@pytest.mark.parametrize(
    ("args", "tier"),
    [
        ([], "--test"),
        (["tests/unit"], "--unit"),
        (["tests/unit/test_cli.py::test_x", "-x", "-k", "help"], "--unit"),
        (["tests/unit", "tests/e2e/test_ops.py"], "--test"),
        (["-k", "help"], "--test"),  # no path: the whole suite, filtered
    ],
)
def test_test_sh_sets_up_the_unit_tier_only_for_paths_inside_it(tmp_path, args, tier):
    """scripts/test.sh in a checkout whose setup.sh, ruff and python are stand-ins recording how they were called.
    The unit tier alone runs on every core."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/test.sh", repo / "scripts")
    for path in ("tests/unit/test_cli.py", "tests/e2e/test_ops.py"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).touch()
    record = '#!/usr/bin/env bash\necho "$(basename "$0") $*" >>"$CALLS"\n'
    for stand_in in ("scripts/setup.sh", ".venv/bin/ruff", ".venv/bin/python"):
        (repo / stand_in).parent.mkdir(parents=True, exist_ok=True)
        (repo / stand_in).write_text(record)
        (repo / stand_in).chmod(0o755)
    calls = tmp_path / "calls"
    result = run([repo / "scripts/test.sh", *args], env={**os.environ, "CALLS": str(calls)})
    assert result.returncode == 0, result.stdout
    assert calls.read_text().splitlines() == [
        f"setup.sh {tier}",
        "ruff check .",
        "ruff format --check .",
        " ".join(["python -m pytest -q -ra --durations=25", *(["-n", "auto"] if tier == "--unit" else []), *args]),
    ]
