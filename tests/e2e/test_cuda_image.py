"""The CUDA image, built here without an NVIDIA base (./build.sh --debian) and checked inside without a GPU, by
scripts/check-cuda-image.sh: nvcc and a kernel compiled with it, torch's CUDA against the lock's, SGLang, FlashAttention
4 and ATTENTION=flash's way into diffusers, then the server on the demo model as OpenShift runs it, answering the
OpenAI SDK and draining on `docker stop`.

Off by default, skipped unless the marker expression names it: it downloads about 6 GB and builds an image of about
20 GB. CI runs it when asked: `pytest -m cuda_image`. Cold on 2 cores: about 25 minutes (the download 3,
the build 15); warm (wheelhouse and build cache kept) a few minutes. Needs what test_container.py needs.
"""

import os
import sys

import pytest

from tests.support.deploy import ROOT, run
from tests.support.docker import docker_daemon

pytestmark = [pytest.mark.cuda_image, pytest.mark.timeout(7200)]


@pytest.fixture(scope="module")
def docker(request):
    if "cuda_image" not in request.config.getoption("markexpr"):
        pytest.skip("the CUDA image check runs only when asked for: pytest -m cuda_image")
    yield from docker_daemon()


def test_the_cuda_image_builds_and_serves_without_a_gpu(docker):
    env = {**os.environ, "DOCKER": docker, "PYTHON": sys.executable}
    env.pop("IMAGE_TAG", None)
    result = run([ROOT / "scripts/check-cuda-image.sh"], env=env)
    assert result.returncode == 0, result.stdout[-10000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("check: ", "figure: "))]
    print("\n".join(lines))  # the figures, for the log of the run that asked for this test (-s)
    assert len([line for line in lines if line.startswith("check: ")]) == 10, lines
    assert "check-cuda-image.sh: all checks passed" in result.stdout
