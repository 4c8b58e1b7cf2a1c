"""build.sh (with a stand-in `docker`; tests/e2e/test_container.py runs it with the real one), download-packages.sh (the
package index part for a few pinned packages, the off-index part from a loopback server) and install.sh's own
checks."""

import gzip
import os
import shutil
import sys
import urllib.parse
from pathlib import Path

import pytest

from tests.support.deploy import ROOT, FileServer, lock_subset, make_wheel, run, sha256

# Stands in for the docker CLI: records its arguments, and for a build the files of the context (its last argument)
# with their inode numbers; `docker save` writes something to stdout.
FAKE_DOCKER = """#!/usr/bin/env bash
echo "$*" >>"$DOCKER_LOG"
if [ "$1" = build ]; then (cd "${!#}" && find . -type f -printf '%P %i\\n' | sort) >"$DOCKER_LOG.context"; fi
if [ "$1" = save ]; then echo "saved $2"; fi
"""
CUDA_ARGS = "--build-arg WITH_SGLANG=1 --build-arg WITH_FLASH_ATTN=0"


@pytest.fixture
def build_repo(tmp_path):
    """A git checkout holding build.sh, what .dockerignore lets into the context and a wheelhouse, and the environment
    that runs build.sh with the fake docker."""
    repo = tmp_path / "repo"
    (repo / "wheelhouse").mkdir(parents=True)
    shutil.copy(ROOT / "build.sh", repo)
    shutil.copy(ROOT / ".dockerignore", repo)
    for folder in ("docker", "requirements", "server", "plugins"):
        (repo / folder).mkdir()
        (repo / folder / "file.txt").write_text(folder)
    for file in ("pyproject.toml", "README.md", "Dockerfile", "notes.txt"):
        (repo / file).write_text(file)
    (repo / "wheelhouse/x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    (repo / ".gitignore").write_text("wheelhouse/\nwheelhouse-cpu/\nout/\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_LOG": str(tmp_path / "docker.log")}
    for name in ("IMAGE_TAG", "WHEELHOUSE", "DOCKER"):
        env.pop(name, None)
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


def built_context(env: dict) -> dict[str, int]:
    """The files of the last build's context, with their inode numbers."""
    lines = Path(env["DOCKER_LOG"] + ".context").read_text().splitlines()
    return {name: int(inode) for name, inode in (line.rsplit(" ", 1) for line in lines)}


def build_call(repo: Path, args: str, tag: str, extra: str = "") -> str:
    """The docker build that build.sh runs: its own arguments, the variant's, the tag, the caller's, the context."""
    labels = f"--label org.opencontainers.image.version={tag} --label org.opencontainers.image.revision="
    labels += git(repo, "rev-parse", "HEAD")
    tagged = f"{labels} --file Dockerfile --tag image-server:{tag}"
    return f"build --progress=plain --build-arg MAX_JOBS=2 {args} {tagged}{extra} {repo}/out/build-context"


def test_build_is_the_cuda_image_with_sglang_tagged_with_the_short_hash(build_repo):
    repo, env = build_repo
    result = run([repo / "build.sh"], cwd=repo, env=env)
    assert result.returncode == 0, result.stdout
    short = git(repo, "rev-parse", "--short", "HEAD")
    assert docker_calls(env) == [build_call(repo, CUDA_ARGS, short)]
    assert "(CUDA, with SGLang)" in result.stdout


CPU_ARGS = (
    "--build-arg BASE_IMAGE=debian:bookworm-slim --build-arg PYTHON=python3.11 "
    "--build-arg LOCK=requirements/cpu-py311.txt --build-arg WHEELS= --build-arg WITH_SGLANG=0 --build-arg COMPILER="
)
DEBIAN = (
    "--build-arg BASE_IMAGE=debian:bookworm-slim --build-arg PYTHON=python3.11 "
    "--build-arg LOCK=requirements/cuda-py311.txt --build-arg WHEELS= --build-arg CUDA_FROM_WHEELS=1 "
    "--build-arg SGLANG_LOCK=requirements/sglang-cuda-py311.txt"
)


@pytest.mark.parametrize(
    ("options", "args", "suffix"),
    [
        (["--lean"], "--build-arg WITH_SGLANG=0 --build-arg WITH_FLASH_ATTN=0", "-lean"),
        (["--flash-attn"], "--build-arg WITH_SGLANG=1 --build-arg WITH_FLASH_ATTN=1", "-flash-attn"),
        (["--lean", "--flash-attn"], "--build-arg WITH_SGLANG=0 --build-arg WITH_FLASH_ATTN=1", "-lean-flash-attn"),
        (["--cpu"], CPU_ARGS + " --build-arg WITH_FLASH_ATTN=0", "-cpu"),
        (["--debian"], f"--build-arg WITH_SGLANG=1 {DEBIAN} --build-arg WITH_FLASH_ATTN=0", "-debian"),
        (["--debian", "--lean"], f"--build-arg WITH_SGLANG=0 {DEBIAN} --build-arg WITH_FLASH_ATTN=0", "-debian-lean"),
    ],
)
def test_each_variant_has_its_build_arguments_and_its_own_tag(build_repo, options, args, suffix):
    repo, env = build_repo
    for variant in ("--cpu", "--debian"):  # each has its own default wheelhouse
        if variant in options:
            shutil.move(repo / "wheelhouse", repo / f"wheelhouse-{variant[2:]}")
    # Extra arguments go to docker build after the variant's, so that they win.
    result = run([repo / "build.sh", *options, "--build-arg", "BASE_IMAGE=mine"], cwd=repo, env=env)
    assert result.returncode == 0, result.stdout
    short = git(repo, "rev-parse", "--short", "HEAD")
    assert docker_calls(env) == [build_call(repo, args, short + suffix, " --build-arg BASE_IMAGE=mine")]


@pytest.mark.parametrize("cuda_option", ["--flash-attn", "--debian"])
def test_flash_attn_and_debian_need_the_cuda_image(build_repo, cuda_option):
    repo, env = build_repo
    result = run([repo / "build.sh", "--cpu", cuda_option], cwd=repo, env=env)
    assert result.returncode == 2 and "need the CUDA image" in result.stdout
    assert docker_calls(env) == []


@pytest.mark.parametrize("how", ["--wheelhouse", "WHEELHOUSE"])
def test_the_context_is_what_dockerignore_lets_in_with_a_wheelhouse_from_anywhere(build_repo, tmp_path, how):
    repo, env = build_repo
    elsewhere = tmp_path / "cache/wheels"
    shutil.move(repo / "wheelhouse", elsewhere)
    options = ["--wheelhouse", str(elsewhere)] if how == "--wheelhouse" else []
    if how == "WHEELHOUSE":
        env["WHEELHOUSE"] = str(elsewhere)
    result = run([repo / "build.sh", *options], cwd=repo, env=env)
    assert result.returncode == 0, result.stdout
    context = built_context(env)
    assert sorted(context) == [
        ".dockerignore", "README.md", "docker/file.txt", "plugins/file.txt", "pyproject.toml",
        "requirements/file.txt", "server/file.txt", "wheelhouse/x-1.0-py3-none-any.whl",
    ]  # fmt: skip
    # hard-linked, not copied: a wheelhouse of many GB costs nothing to stage
    assert context["wheelhouse/x-1.0-py3-none-any.whl"] == (elsewhere / "x-1.0-py3-none-any.whl").stat().st_ino
    assert not (repo / "out/build-context").exists()  # removed after the build


def test_build_tags_the_git_tag_and_save_prints_the_matching_load(build_repo):
    repo, env = build_repo
    git(repo, "tag", "v1.2.3")
    result = run([repo / "build.sh", "--save"], cwd=repo, env=env)
    assert result.returncode == 0, result.stdout
    assert docker_calls(env) == [build_call(repo, CUDA_ARGS, "v1.2.3"), "save image-server:v1.2.3"]
    archive = repo / "out/image-server-v1.2.3.tar.gz"
    assert gzip.decompress(archive.read_bytes()) == b"saved image-server:v1.2.3\n"
    assert result.stdout.splitlines()[-1] == "docker load -i out/image-server-v1.2.3.tar.gz"


def test_build_marks_uncommitted_changes(build_repo):
    repo, env = build_repo
    (repo / "build.sh").write_text((repo / "build.sh").read_text() + "\n")
    result = run([repo / "build.sh", "--cpu", "--wheelhouse", "wheelhouse"], cwd=repo, env=env)
    assert result.returncode == 0, result.stdout
    assert f"image-server:{git(repo, 'rev-parse', '--short', 'HEAD')}-dirty-cpu " in docker_calls(env)[0]


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


@pytest.mark.parametrize("variant", [[], ["--cpu"], ["--debian", "--lean"]])
def test_build_refuses_an_empty_wheelhouse_and_says_how_to_fill_it(build_repo, variant):
    repo, env = build_repo
    shutil.rmtree(repo / "wheelhouse")
    result = run([repo / "build.sh", *variant], cwd=repo, env=env)
    assert result.returncode != 0
    assert f"run {' '.join(['./download-packages.sh', *variant])} first" in result.stdout
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


@pytest.mark.parametrize(
    ("options", "locks", "python"),
    [
        ([], ["cuda-py312.txt", "sglang-cuda-py312.txt"], "3.12"),  # ./build.sh's default: CUDA with SGLang
        (["--lean"], ["cuda-py312.txt"], "3.12"),
        (["--cpu"], ["cpu-py311.txt"], "3.11"),
        (["--debian"], ["cuda-py311.txt", "sglang-cuda-py311.txt"], "3.11"),  # the CUDA image on Debian 12
        (["--debian", "--lean"], ["cuda-py311.txt"], "3.11"),
    ],
)
def test_download_fetches_the_locks_of_each_variant(tmp_path, options, locks, python):
    log = tmp_path / "pip.log"
    fake_python = tmp_path / "python"  # records each `python -m pip download ...`
    fake_python.write_text(f'#!/usr/bin/env bash\necho "$*" >>{log}\n')
    fake_python.chmod(0o755)
    dest = tmp_path / "wheelhouse"
    command = [ROOT / "download-packages.sh", *options, "--wheels", "", "--dest", dest]
    result = run(command, env={**os.environ, "PYTHON": str(fake_python)})
    assert result.returncode == 0, result.stdout
    calls = log.read_text().splitlines()
    assert [call.split(" -r ")[1] for call in calls] == [str(ROOT / "requirements" / lock) for lock in locks]
    assert all(f"--python-version {python} " in call for call in calls)


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


def test_install_takes_the_locks_pins_when_the_wheelhouse_holds_another_locks_newer_ones(tmp_path):
    """The server's and SGLang's locks share one wheelhouse. A pinned package that needs another with an extra
    (nvidia-cudnn-frontend: nvidia-cutlass-dsl[cu13]>=4.8.0) made pip resolve that one again and take the newest wheel
    there (the server lock's 4.8.1, not SGLang's 4.8.0), which --require-hashes refuses: the SGLang venv failed to
    build. The lock's own pins are installed instead."""
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    older = make_wheel(wheelhouse, "dsl", "1.0", "Provides-Extra: cu13\n")
    make_wheel(wheelhouse, "dsl", "1.1", "Provides-Extra: cu13\n")  # another lock's
    frontend = make_wheel(wheelhouse, "frontend", "1.0", "Requires-Dist: dsl[cu13]>=1.0\n")
    lock = tmp_path / "lock.txt"
    lock.write_text(f"dsl==1.0 --hash=sha256:{sha256(older)}\nfrontend==1.0 --hash=sha256:{sha256(frontend)}\n")
    venv = tmp_path / "venv"
    install = [ROOT / "docker/install.sh", "--venv", venv, "--python", sys.executable]
    result = run([*install, "--wheelhouse", wheelhouse, "--lock", lock])
    assert result.returncode == 0, result.stdout
    assert "No broken requirements found" in result.stdout  # pip check: the lock was the whole set
    versions = run([venv / "bin/python", "-c", "import importlib.metadata as m; print(m.version('dsl'))"])
    assert versions.stdout.strip() == "1.0"
