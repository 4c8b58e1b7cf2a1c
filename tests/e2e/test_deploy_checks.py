"""Static checks: shellcheck on every shell script, hadolint and the image's policies on the Dockerfile, and locks
that match pyproject.toml and the Dockerfile's CUDA."""

import os
import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.deploy import ROOT, lock_entries, run, tool

SKIP_DIRS = {".git", ".venv", "node_modules", "wheelhouse", "out", "build", "__pycache__"}
SHEBANG = re.compile(r"^#!\s*(/usr/bin/env\s+)?(/bin/|/usr/bin/)?(ba|da)?sh\b")
LOCKS = {
    "cuda": ROOT / "requirements/cuda-py312.txt",
    "cuda-debian": ROOT / "requirements/cuda-py311.txt",  # ./build.sh --debian
    "cpu": ROOT / "requirements/cpu-py311.txt",
}


def shell_scripts() -> list[str]:
    """Every shell script of the checkout: *.sh files and files whose shebang names sh or bash."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith((".egg-info", "_cache"))]
        for name in files:
            path = Path(folder, name)
            with path.open("rb") as f:
                first = f.readline(200).decode(errors="replace")
            if name.endswith(".sh") or SHEBANG.match(first):
                found.append(path.relative_to(ROOT).as_posix())
    return sorted(found)


def test_every_shell_script_passes_shellcheck():
    scripts = shell_scripts()
    # The walk finds scripts wherever they are, with or without the .sh suffix.
    assert {".ci/run", "scripts/setup.sh", "examples/generate.sh", "build.sh", "multi-gpu/run.sh"} <= set(scripts)
    result = run([tool("shellcheck"), "--external-sources", *scripts])  # from the root: `source=` paths resolve
    assert result.returncode == 0, result.stdout


def test_dockerfile_passes_hadolint():
    result = run([tool("hadolint"), "Dockerfile"])
    assert result.returncode == 0, result.stdout


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def test_dockerfile_policies():
    instructions = dockerfile()
    keywords = [k for k, _ in instructions]
    args = " ".join(a for k, a in instructions if k == "ARG")
    assert keywords.count("FROM") == 1  # one stage
    assert re.search(r"CUDA_VERSION=\d+\.\d+", args) and "-devel-" in args  # nvcc stays for Triton/flash-attn
    env = " ".join(a for k, a in instructions if k == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "HOST=0.0.0.0", "MODEL_PATH=/app/models"):
        assert setting in env
    for cache in ("HF_HOME", "TORCH_HOME", "TRITON_CACHE_DIR"):  # all under the one writable path
        assert re.search(rf"\b{cache}=/app/state/", env), cache
    runs = " ".join(a for k, a in instructions if k == "RUN")
    # One Python for the base's packages and every venv: Ubuntu 24.04's 3.12 by default (the CUDA lock's).
    assert "PYTHON=python3.12" in args
    assert '"${PYTHON}" "${PYTHON}-venv" "${PYTHON}-dev"' in runs and "libnuma1" in runs
    assert runs.count('--python "${PYTHON}"') == 2  # the server's venv and SGLang's
    # The default image is the mission's: the SGLang engine in, flash-attn a build argument away.
    assert "WITH_SGLANG=1" in args and "WITH_FLASH_ATTN=0" in args
    assert "chown -R 1001:0 /app/state" in runs and "chmod -R g=u /app/state" in runs
    assert "docker/install.sh" in runs and "--lock" in runs and "pip install" not in runs  # wheelhouse only
    assert ("USER", "1001:0") in instructions
    assert any(k == "EXPOSE" for k in keywords)
    assert any(k == "HEALTHCHECK" and "/health" in a for k, a in instructions)
    assert ("ENTRYPOINT", '["/app/docker/entrypoint.sh"]') in instructions


def test_every_docker_context_path_exists():
    """What the Dockerfile copies or mounts is in the build context (.dockerignore lets it through)."""
    ignore = (ROOT / ".dockerignore").read_text()
    for keyword, arguments in dockerfile():
        if keyword == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert f"!{source.split('/')[0]}" in ignore, source
    assert "!wheelhouse/" in ignore  # bind-mounted by the install step


@pytest.mark.parametrize("target", LOCKS)
def test_lock_pins_every_dependency_of_pyproject_with_hashes(target):
    """A dependency added to pyproject.toml without `requirements/lock.sh` would be missing from the image."""
    pins = lock_entries(LOCKS[target])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # install.sh builds the project offline with --no-build-isolation: the build backend comes from the lock too
    for requirement in map(Requirement, pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in {LOCKS[target].name}: run requirements/lock.sh"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), (name, pins[name][0])
    assert all(hashes for _, hashes in pins.values())


@pytest.mark.parametrize("target", ["cuda", "cuda-debian"])
def test_cuda_lock_matches_the_dockerfile_cuda(target):
    pins = lock_entries(LOCKS[target])
    assert "+" not in pins["torch"][0]  # PyPI's Linux torch: the CUDA build
    cuda = re.search(r"CUDA_VERSION=(\d+\.\d+)", (ROOT / "Dockerfile").read_text())[1]
    assert pins["cuda-toolkit"][0].startswith(cuda + "."), (pins["cuda-toolkit"], cuda)
    assert lock_entries(LOCKS["cpu"])["torch"][0].endswith("+cpu")
    assert "flash-attn-4" in pins and "kernels" in pins  # ATTENTION=flash on Hopper and Blackwell


def test_the_debian_cuda_lock_brings_the_toolchain_of_torchs_cuda():
    """./build.sh --debian has no NVIDIA base: nvcc, its headers and CCCL come from the lock, at torch's CUDA (the
    Dockerfile links them to /usr/local/cuda/ under the cu<major> folder they install into)."""
    pins = lock_entries(LOCKS["cuda-debian"])
    cuda = pins["cuda-toolkit"][0].rsplit(".", 2)[0]  # 13.0.3.0 -> 13.0
    for name in ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-cccl", "nvidia-cuda-runtime"):
        assert pins[name][0].startswith(cuda + "."), (name, pins[name][0], cuda)
    assert f"site-packages/nvidia/cu{cuda.split('.')[0]}" in (ROOT / "Dockerfile").read_text()
    assert "nvidia-cuda-nvcc" not in lock_entries(LOCKS["cuda"])  # the NVIDIA base has its own


def test_flash_attn_list_puts_back_the_locked_fa4():
    """flash-attn 2's wheel carries an old flash_attn/cute: the list ends with the FA4 wheel the locks pin."""
    result = run(
        ["bash", "-c", f"source {ROOT}/docker/wheel-list.sh && wheel_list {ROOT}/requirements/flash-attn-cuda.txt"]
    )
    assert result.returncode == 0, result.stdout
    _, sha, name = result.stdout.splitlines()[-1].split()
    for target in ("cuda", "cuda-debian"):
        version, hashes = lock_entries(LOCKS[target])["flash-attn-4"]
        assert name == f"flash_attn_4-{version}-py3-none-any.whl" and sha in hashes, (target, name)


def test_the_nunchaku_line_shown_in_the_wheel_list_is_well_formed(tmp_path):
    """The example in requirements/wheels-cuda.txt (and docs/DEPLOYMENT.md) parses as an entry once uncommented, and
    names a wheel for the image's torch, CUDA and Python."""
    (example,) = [
        line.removeprefix("#").strip()
        for line in (ROOT / "requirements/wheels-cuda.txt").read_text().splitlines()
        if "github.com/nunchaku-ai/nunchaku/releases/download/" in line
    ]
    url = example.split()[0]
    assert url in (ROOT / "docs/DEPLOYMENT.md").read_text()
    listed = tmp_path / "wheels.txt"
    listed.write_text(example.replace("<sha256>", "0" * 64) + "\n")
    result = run(["bash", "-c", f"source {ROOT}/docker/wheel-list.sh && wheel_list {listed}"])
    assert result.returncode == 0, result.stdout
    name = result.stdout.split()[2]
    assert name.startswith("nunchaku-") and "+cu13.0torch2.13-cp312-cp312-linux_x86_64.whl" in name, name
    cuda = re.search(r"CUDA_VERSION=(\d+\.\d+)", (ROOT / "Dockerfile").read_text())[1]
    torch = lock_entries(LOCKS["cuda"])["torch"][0]
    assert f"cu{cuda}torch{'.'.join(torch.split('.')[:2])}" in name
