#!/usr/bin/env bash
# Build the CUDA image where no NVIDIA base image can be pulled, and check inside it what runs without a GPU.
# The image is ./build.sh --debian: a Debian 12 base (docker/debian-base.sh), CUDA's toolchain from PyPI wheels, the
# server's and SGLang's CUDA locks for CPython 3.11. Not in the default test run: the wheelhouse is about 6 GB and the
# image about 20 GB. `pytest -m cuda_image` runs it (tests/e2e/test_cuda_image.py).
#
#   scripts/check-cuda-image.sh [extra build.sh flags, e.g. --lean]
#
# In the image: nvcc, a CUDA kernel compiled and linked with it (for Hopper and Blackwell; run, it finds no GPU), the
# CUDA of torch against the lock's, SGLang and its diffusion server's entry point in /opt/sglang, FlashAttention 4 in
# both venvs and the server's ATTENTION=flash path into diffusers (set, not run: that needs a GPU),
# `image-server serve --help`; then the server on --model demo, on the CPU, under an arbitrary UID with a read-only
# root as OpenShift's restricted-v2 runs it: it answers the OpenAI SDK and drains queued work on `docker stop`.
# Prints "check: ..." per check and "figure: ..." for the sizes and times; exits non-zero at the first failure.
# Needs root (mmdebstrap), a docker daemon with BuildKit, and a Python with the openai package (scripts/setup.sh).
# Environment: IMAGE_TAG (default cuda-check), WHEELHOUSE (default wheelhouse-debian/), BASE_IMAGE (default
# docker/debian-base.sh's), DOCKER (the CLI), PYTHON (default .venv/bin/python). The image stays (the next run
# reuses its layers): `docker rmi image-server:cuda-check` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
docker=${DOCKER:-docker}
python=${PYTHON:-.venv/bin/python}
image=image-server:${IMAGE_TAG:-cuda-check}
export DOCKER=$docker WHEELHOUSE=${WHEELHOUSE:-$PWD/wheelhouse-debian}
# The CUDA the locked torch is built for: cuda-toolkit, the metapackage torch pins (13.0.3.0 -> 13.0).
cuda=$(sed -n 's/^cuda-toolkit==\([0-9]*\.[0-9]*\)\..*/\1/p' requirements/cuda-py311.txt)

check() { echo "check: $*"; }
figure() { echo "figure: $*"; }
fail() {
  echo "check-cuda-image.sh: FAILED: $*" >&2
  exit 1
}

# -- build ------------------------------------------------------------------------

base=${BASE_IMAGE:-$(docker/debian-base.sh)}
SECONDS=0
./download-packages.sh --debian --dest "$WHEELHOUSE"
figure "wheelhouse $(du -sh "$WHEELHOUSE" | cut -f1), $(find "$WHEELHOUSE" -maxdepth 1 -type f | wc -l) files, ready in ${SECONDS}s"
SECONDS=0
# --network host: the build's apt-get reaches Debian's mirror as this machine does, bridge or no bridge.
IMAGE_TAG=${image#image-server:} ./build.sh --debian --build-arg BASE_IMAGE="$base" --network host "$@"
figure "build ${SECONDS}s"
size=$("$docker" image inspect --format '{{.Size}}' "$image")
figure "image $image $((size / 1000000)) MB"

# -- inside the image, as OpenShift runs it: any UID in group 0, read-only root, no network ----------------------

openshift=(--user 1000770000:0 --read-only --cap-drop ALL --security-opt no-new-privileges
  --tmpfs "/app/state:rw,exec,mode=0777" --tmpfs "/tmp:rw,exec,mode=0777" --shm-size 2g)
in_image() { "$docker" run --rm -i --network none "${openshift[@]}" "$image" "$@"; }

figure "installed $(in_image du -sh /opt/venv /opt/sglang | tr '\t\n' ' ')"

nvcc=$(in_image nvcc --version)
[[ $nvcc == *"release $cuda,"* ]] || fail "nvcc is not CUDA $cuda: $nvcc"
check "nvcc: $(grep release <<<"$nvcc")"

# A kernel that needs the CUDA headers, CCCL (thrust) and libcudart_static, for Hopper and Blackwell. Run here it
# finds no GPU, which it says; that it runs at all shows it linked.
kernel=$(
  in_image bash -c 'cat >/tmp/add.cu && cd /tmp && nvcc -gencode arch=compute_90,code=sm_90 \
    -gencode arch=compute_100,code=sm_100 -o add add.cu && ./add' <<'EOF'
#include <cstdio>
#include <cuda_runtime.h>
#include <thrust/device_vector.h>

__global__ void add(int n, const float *x, float *y) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}

int main() {
  int devices = 0;
  cudaError_t status = cudaGetDeviceCount(&devices);
  printf("compiled and linked; CUDA devices here: %d (%s)\n", devices, cudaGetErrorString(status));
  return 0;
}
EOF
)
check "a CUDA kernel (sm_90, sm_100): $kernel"

torch_cuda=$(in_image python -c 'import torch; print(torch.version.cuda)')
[ "$torch_cuda" = "$cuda" ] || fail "torch is built for CUDA $torch_cuda, the lock's is $cuda"
check "torch.version.cuda $torch_cuda, as the lock"

sglang=$(in_image /opt/sglang/bin/python -c 'import sglang, importlib.metadata as m; print(m.version("sglang"))')
check "import sglang in /opt/sglang: $sglang"
# The command the server runs (server/engines/sglang/engine.py): `sglang serve --model-type diffusion`. Its help
# imports the diffusion server (sglang.multimodal_gen), and says "not available" (exit 0) when that fails.
help=$(in_image /opt/sglang/bin/sglang serve --model-type diffusion --help)
[[ $help == *"SGLang Diffusion Model Serving"*"--model-path"* ]] || fail "sglang serve --model-type diffusion: $help"
check "sglang serve --model-type diffusion --help: the diffusion server's entry point imports"

fa4=$(in_image python -c 'import flash_attn.cute, importlib.metadata as m; print(m.version("flash-attn-4"))')
in_image /opt/sglang/bin/python -c 'import flash_attn.cute' || fail "FA4 in /opt/sglang"
check "import flash_attn.cute (FlashAttention $fa4) in /opt/venv and /opt/sglang"
# ATTENTION=flash on a Hopper or Blackwell GPU: diffusers takes the installed FA4 for its flash_4_hub backend, with
# the real `kernels` package and nothing downloaded (--network none). Running it needs the GPU.
attention=$(in_image python - <<'EOF'
from pathlib import Path

from server.engines.demos import demo_model_path
from server.engines.diffusers import load_pipeline
from server.engines.fastpath import GPU, choose_attention, installed_kernels, set_attention

import torch

pipe = load_pipeline(demo_model_path(Path("/app/state/cache")), torch.bfloat16)
backend = choose_attention("flash", GPU("NVIDIA H100 80GB HBM3", (9, 0)), installed_kernels())
print(set_attention(pipe.transformer, backend, "flash"))
EOF
)
[ "$attention" = "flash (FlashAttention 4)" ] || fail "ATTENTION=flash on Hopper: $attention"
check "ATTENTION=flash on Hopper sets $attention in diffusers"

# Into a variable, not `| grep -q`: grep's early exit would break docker's pipe and fail the check.
serve_help=$(in_image image-server serve --help)
[[ $serve_help == *--model* ]] || fail "image-server serve --help: $serve_help"
check "image-server serve --help"

# -- the server, on the demo model, on the CPU ------------------------------------------------------------------

name=cuda-check-$$
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
trap '"$docker" rm -f "$name" >/dev/null 2>&1 || true' EXIT
"$docker" run -d --name "$name" "${openshift[@]}" -p "127.0.0.1:$port:8000" -e MODEL_PATH=demo "$image" >/dev/null
SECONDS=0
until curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; do
  [ "$("$docker" inspect --format '{{.State.Running}}' "$name")" = true ] || fail "the server exited: $("$docker" logs "$name" 2>&1 | tail -20)"
  [ $SECONDS -lt 300 ] || fail "not ready in 300 s"
  sleep 1
done
figure "ready on --model demo in ${SECONDS}s"

# The OpenAI SDK, then `docker stop` with work queued: what was accepted is answered, and the server exits 0.
"$python" - "http://127.0.0.1:$port" "$docker" "$name" <<'EOF'
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

url, docker, name = sys.argv[1:]
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
result = client.images.generate(prompt="a lighthouse", size="256x256", n=2, extra_body={"num_inference_steps": 2})
assert len(result.data) == 2 and all(d.b64_json for d in result.data), result
print("check: the OpenAI SDK: images.generate answered 2 images of 256x256")


def in_flight() -> float:
    metrics = httpx.get(url + "/metrics").text
    return next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("image_server_in_flight"))


slow = {"num_inference_steps": 28}
with ThreadPoolExecutor(4) as pool:
    work = []
    for i in range(3):  # each sent once the server has accepted the one before: all three are accepted at the stop
        body = {**slow, "seed": i}
        work.append(pool.submit(client.images.generate, prompt=f"queued {i}", size="512x512", extra_body=body))
        deadline = time.monotonic() + 120
        while in_flight() < i + 1:
            assert time.monotonic() < deadline, f"request {i + 1} not accepted"
            time.sleep(0.05)
    stop = subprocess.run([docker, "stop", "--time", "300", name], capture_output=True, text=True)
    assert stop.returncode == 0, stop.stderr
    answered = [len(f.result().data) for f in work]
assert answered == [1, 1, 1], answered
code = subprocess.run([docker, "inspect", "--format", "{{.State.ExitCode}}", name], capture_output=True, text=True)
assert code.stdout.strip() == "0", code.stdout
logs = subprocess.run([docker, "logs", name], capture_output=True, text=True)
assert "draining" in logs.stdout + logs.stderr
print("check: docker stop drained 3 accepted requests (all answered) and the server exited 0")
EOF
echo "check-cuda-image.sh: all checks passed ($image)"
