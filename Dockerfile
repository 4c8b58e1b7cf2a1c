# image-server, installable offline. Build with ./build.sh once ./download-packages.sh has filled the wheelhouse
# (docs/DEPLOYMENT.md). One file, three variants:
#   CUDA (the default): the NVIDIA devel base, Ubuntu 24.04's Python 3.12, the CUDA lock, and the SGLang engine;
#   CUDA on Debian (./build.sh --debian): a Debian 12 base, its Python 3.11, the CUDA lock for it, which adds CUDA's
#     devel toolchain from PyPI wheels (for builders that cannot pull the NVIDIA base), and the SGLang engine;
#   CPU (./build.sh --cpu): a Debian 12 base, its Python 3.11, the CPU lock (CI runs this one for real).
# One stage on purpose: the CUDA devel base keeps gcc, nvcc and ninja in the image, which Triton's JIT (torch.compile)
# and flash-attn/Nunchaku source builds need at run or build time.
# CUDA_VERSION follows the CUDA of the locked torch (requirements/cuda.in: torch 2.13.0 is built for CUDA 13.0).
ARG CUDA_VERSION=13.0.2
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# PYTHON is the base's own Python, named as its packages are: python3.12 on Ubuntu 24.04, python3.11 on Debian 12
# (both ship python3.X, python3.X-venv and python3.X-dev). -dev because Triton compiles its launcher stubs against
# Python.h at run time. libnuma1: SGLang's kernels link against it. ninja-build: torch extension builds (flash-attn).
# COMPILER: the host compiler of nvcc and Triton's JIT; the NVIDIA devel base has it already, a Debian base does
# not (the CPU variant leaves it out). curl: the HEALTHCHECK. apt-get clean: a base made with mmdebstrap
# (docker/debian-base.sh) would keep the downloaded packages (100 MB); the official images delete them by themselves.
# Not pinned to versions: the base image's tag is the pin, and the archives drop superseded versions, so exact pins
# would break the build at the next security update.
ARG PYTHON=python3.12
ARG COMPILER=g++
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      "${PYTHON}" "${PYTHON}-venv" "${PYTHON}-dev" ${COMPILER} libnuma1 ninja-build curl ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

# UID 1001 in group 0: OpenShift runs the image under an arbitrary UID that is always in group 0, so every path the
# server writes belongs to group 0 and is group-writable. USER is numeric so the kubelet can check runAsNonRoot.
# USER set for tools that ask for a user name, which an arbitrary UID without a passwd entry does not have.
RUN useradd --uid 1001 --gid 0 --no-create-home --home-dir /app/state/home --shell /usr/sbin/nologin image-server

# One writable path, /app/state: HOME and every cache (Hugging Face, torch, Inductor, Triton, CUDA JIT) and the
# images served by URL. In Kubernetes it is an emptyDir; the root filesystem can then be read-only.
ENV PATH=/opt/venv/bin:/usr/local/cuda/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    USER=image-server \
    HOME=/app/state/home \
    XDG_CACHE_HOME=/app/state/cache \
    HF_HOME=/app/state/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TORCH_HOME=/app/state/cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/app/state/cache/torchinductor \
    TRITON_CACHE_DIR=/app/state/cache/triton \
    CUDA_CACHE_PATH=/app/state/cache/nv \
    CACHE_DIR=/app/state/cache/image-server \
    IMAGE_DIR=/app/state/images \
    MODEL_PATH=/app/models \
    HOST=0.0.0.0 \
    PORT=8000 \
    PYTHONUNBUFFERED=1

WORKDIR /app

# Dependencies first, in their own layer: it changes only when a lock does. The wheelhouse is bind-mounted, not
# copied, so its gigabytes never become a layer. MAX_JOBS bounds the compile jobs of any sdist in the wheel list.
# WHEELS may be empty (the CPU variant has no off-index wheels).
ARG MAX_JOBS=2
ARG LOCK=requirements/cuda-py312.txt
ARG WHEELS=requirements/wheels-cuda.txt
COPY docker/install.sh docker/wheel-list.sh docker/entrypoint.sh /app/docker/
COPY requirements/ /app/src/requirements/
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    MAX_JOBS=${MAX_JOBS} /app/docker/install.sh --python "${PYTHON}" --venv /opt/venv \
      --wheelhouse /wheelhouse --lock "/app/src/${LOCK}" ${WHEELS:+--wheels "/app/src/${WHEELS}"}

# A base without CUDA's toolkit (./build.sh --debian) has it from the lock's PyPI wheels
# (requirements/cuda-toolchain.in), under the venv's site-packages/nvidia/cu13: /usr/local/cuda points there, where
# the NVIDIA base keeps its own, as PATH and CUDA_HOME (torch's extension builds, flashinfer's JIT) expect. The wheels
# put the libraries in lib/, where nvcc's profile links from lib64/ (libcudart_static): that link too.
ARG CUDA_FROM_WHEELS=0
RUN if [ "${CUDA_FROM_WHEELS}" = 1 ]; then \
      toolkit="/opt/venv/lib/${PYTHON}/site-packages/nvidia/cu13" \
      && ln -s "${toolkit}" /usr/local/cuda \
      && ln -s lib "${toolkit}/lib64" \
      && nvcc --version; \
    fi

# flash-attn 2 (ATTENTION=flash where FlashAttention 4 does not run: Ampere, Ada), optional: built here from its PyPI
# sdist against the image's torch with nvcc, MAX_JOBS jobs (hours at 2; each job may take 8-9 GB of memory). Its list
# (URL SHA256: einops, wheel, the sdist, then FA4 again over the files flash-attn 2 overwrites) is fetched by
# ./download-packages.sh. FORCE_BUILD: never fetch a prebuilt wheel from GitHub, the wheelhouse is the only source.
# FLASH_ATTN_CUDA_ARCHS: the GPU generations compiled for, by default Ampere's (8.0; Ada runs it too): Hopper and
# Blackwell take FA4, so compiling for them (90;100;120) only costs build time.
ARG WITH_FLASH_ATTN=0
ARG FLASH_ATTN=requirements/flash-attn-cuda.txt
ARG FLASH_ATTN_CUDA_ARCHS="80"
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if [ "${WITH_FLASH_ATTN}" = 1 ]; then \
      FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}" MAX_JOBS=${MAX_JOBS} \
        /app/docker/install.sh --venv /opt/venv --wheelhouse /wheelhouse --wheels "/app/src/${FLASH_ATTN}"; \
    fi

# The SGLang engine (ENGINE=sglang), in by default (./build.sh --lean leaves it out): its own venv, so its exact
# torch/transformers/diffusers pins never meet the server's. Its wheels (several GB) come from SGLANG_LOCK, which
# ./download-packages.sh fetches with the CUDA lock. CUDA and Python 3.12 only: the CPU variant builds without it.
ARG WITH_SGLANG=1
ARG SGLANG_LOCK=requirements/sglang-cuda-py312.txt
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if [ "${WITH_SGLANG}" = 1 ]; then \
      /app/docker/install.sh --python "${PYTHON}" --venv /opt/sglang --wheelhouse /wheelhouse \
        --lock "/app/src/${SGLANG_LOCK}"; \
    fi
ENV SGLANG_BIN=/opt/sglang/bin/sglang

# Then the server itself, without dependencies (the lock has them all; install.sh ends with pip check).
COPY pyproject.toml README.md /app/src/
COPY server/ /app/src/server/
COPY plugins/ /app/src/plugins/
RUN /app/docker/install.sh --venv /opt/venv --project /app/src \
 && rm -rf /app/src/build \
 && mkdir -p /app/models /app/state/home /app/state/cache /app/state/images \
 && chown -R 1001:0 /app/state \
 && chmod -R g=u /app/state

USER 1001:0
EXPOSE 8000
# Liveness only: /health answers while the model loads. Readiness (/ready) is for the orchestrator's routing.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/bin/bash", "-c", "curl -fsS \"http://127.0.0.1:${PORT}/health\" >/dev/null"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
