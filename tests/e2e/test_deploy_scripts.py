"""build.sh (with a stand-in `docker`: this machine has no Docker engine), download-packages.sh (the package index
part for a few pinned packages, the off-index part from a loopback server) and install.sh's own checks."""

import gzip
import os
import shutil
import sys
import urllib.parse
from pathlib import Path

import pytest

from tests.support.deploy import ROOT, FileServer, lock_subset, make_wheel, run, sha256

# Stands in for the docker CLI: records its arguments; `docker save` writes something to stdout.
FAKE_DOCKER = """#!/usr/bin/env bash
echo "$*" >>"$DOCKER_LOG"
if [ "$1" = save ]; then echo "saved $2"; fi
"""


@pytest.fixture
def build_repo(tmp_path):
    """A git checkout holding build.sh and a wheelhouse, and the environment that runs it with the fake docker."""
    repo = tmp_path / "repo"
    (repo / "wheelhouse").mkdir(parents=True)
    shutil.copy(ROOT / "build.sh", repo)
    (repo / "wheelhouse/x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    (repo / ".gitignore").write_text("wheelhouse/\nout/\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_LOG": str(tmp_path / "docker.log")}
    env.pop("IMAGE_TAG", None)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    return repo, env


def git(repo: Path, *args: str) -> str:
    result = run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo)
    assert result.returncode == 0, result.stdout
    return result.stdout.strip()


def docker_calls(env: dict) -> list[str]:
    log = Path(env["DOCKER_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def test_build_tags_the_short_hash_with_plain_progress_and_two_jobs(build_repo):
    repo, env = build_repo
    result = run([repo / "build.sh"], cwd=repo, env=env)
    assert result.returncode == 0, result.stdout
    short = git(repo, "rev-parse", "--short", "HEAD")
    assert docker_calls(env) == [f"build --progress=plain --build-arg MAX_JOBS=2 --tag image-server:{short} ."]


def test_build_tags_the_git_tag_and_save_prints_the_matching_load(build_repo):
    repo, env = build_repo
    git(repo, "tag", "v1.2.3")
    result = run([repo / "build.sh", "--save"], cwd=repo, env=env)
    assert result.returncode == 0, result.stdout
    assert docker_calls(env) == [
        "build --progress=plain --build-arg MAX_JOBS=2 --tag image-server:v1.2.3 .",
        "save image-server:v1.2.3",
    ]
    archive = repo / "out/image-server-v1.2.3.tar.gz"
    assert gzip.decompress(archive.read_bytes()) == b"saved image-server:v1.2.3\n"
    assert result.stdout.splitlines()[-1] == "docker load -i out/image-server-v1.2.3.tar.gz"


def test_build_marks_uncommitted_changes(build_repo):
    repo, env = build_repo
    (repo / "build.sh").write_text((repo / "build.sh").read_text() + "\n")
    result = run([repo / "build.sh"], cwd=repo, env=env)
    assert result.returncode == 0, result.stdout
    assert docker_calls(env)[0].endswith(f"image-server:{git(repo, 'rev-parse', '--short', 'HEAD')}-dirty .")


@pytest.mark.parametrize("how", ["git tag", "IMAGE_TAG"])
def test_build_refuses_latest(build_repo, how):
    repo, env = build_repo
    if how == "git tag":
        git(repo, "tag", "latest")
    else:
        env["IMAGE_TAG"] = "latest"
    result = run([repo / "build.sh"], cwd=repo, env=env)
    assert result.returncode != 0 and "refusing the tag 'latest'" in result.stdout
    assert docker_calls(env) == []


def test_build_refuses_an_empty_wheelhouse(build_repo):
    repo, env = build_repo
    shutil.rmtree(repo / "wheelhouse")
    result = run([repo / "build.sh"], cwd=repo, env=env)
    assert result.returncode != 0 and "download-packages.sh" in result.stdout
    assert docker_calls(env) == []


@pytest.fixture
def release_page(tmp_path):
    """An off-index wheel on a loopback HTTP server, named with a '+' that its URL spells %2B."""
    folder = tmp_path / "releases"
    folder.mkdir()
    wheel = make_wheel(folder)
    server = FileServer(folder)
    url = f"{server.url}/{urllib.parse.quote(wheel.name)}"
    assert "%2B" in url
    yield server, wheel, url
    server.close()


def download(tmp_path: Path, wheels: Path, dest: Path):
    """download-packages.sh for three pinned packages of the CUDA lock: two compiled for CPython 3.12 (not this
    Python), one pure."""
    lock = tmp_path / "subset.txt"
    lock.write_text(lock_subset(ROOT / "requirements/cuda-py312.txt", {"idna", "markupsafe", "pyyaml"}))
    env = {**os.environ, "PYTHON": sys.executable}
    return run([ROOT / "download-packages.sh", "--lock", lock, "--wheels", wheels, "--dest", dest], env=env)


def test_download_fills_the_wheelhouse_for_the_target_and_is_idempotent(tmp_path, release_page):
    server, wheel, url = release_page
    wheels = tmp_path / "wheels.txt"
    wheels.write_text(f"# off-index\n{url} {sha256(wheel)}\n")
    dest = tmp_path / "wheelhouse"

    first = download(tmp_path, wheels, dest)
    assert first.returncode == 0, first.stdout
    names = sorted(p.name for p in dest.iterdir())
    assert len(names) == 4 and "fetched 4 file(s)" in first.stdout
    assert wheel.name in names  # percent-decoded
    assert any(n.startswith("markupsafe-") and "-cp312-cp312-manylinux" in n for n in names)
    assert any(n.startswith("pyyaml-") and "-cp312-cp312-manylinux" in n for n in names)
    assert (dest / wheel.name).read_bytes() == wheel.read_bytes()

    second = download(tmp_path, wheels, dest)
    assert second.returncode == 0, second.stdout
    assert "fetched nothing" in second.stdout
    assert server.gets[f"/{wheel.name}"] == 1  # not fetched again

    (dest / wheel.name).write_bytes(b"truncated")  # a damaged copy is replaced
    third = download(tmp_path, wheels, dest)
    assert third.returncode == 0, third.stdout
    assert server.gets[f"/{wheel.name}"] == 2 and sha256(dest / wheel.name) == sha256(wheel)


def test_download_refuses_a_wheel_whose_sha256_differs(tmp_path, release_page):
    _, wheel, url = release_page
    wheels = tmp_path / "wheels.txt"
    wheels.write_text(f"{url} {'0' * 64}\n")
    dest = tmp_path / "wheelhouse"
    result = download(tmp_path, wheels, dest)
    assert result.returncode != 0 and "sha256 mismatch" in result.stdout
    assert not (dest / wheel.name).exists()
    assert not list(dest.glob(".partial*"))


def test_install_refuses_an_off_index_wheel_whose_sha256_differs(tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wheel = make_wheel(wheelhouse)
    wheels = tmp_path / "wheels.txt"
    wheels.write_text(f"https://example.org/{wheel.name} {'0' * 64}\n")
    venv = tmp_path / "venv"
    install = [ROOT / "docker/install.sh", "--venv", venv, "--python", sys.executable]
    result = run([*install, "--wheelhouse", wheelhouse, "--wheels", wheels])
    assert result.returncode != 0 and "FAILED" in result.stdout
    assert not list(venv.glob("lib/python*/site-packages/offindex_demo"))
