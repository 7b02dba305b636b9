# syntax=docker/dockerfile:1.7
# fprotoseg GPU worker image: a Celery worker (`fprotoseg worker`) that runs whole-slide jobs on
# one NVIDIA GPU. CUDA base + a pinned CPython + torch's CUDA build + the project installed with the
# one pinned dependency set (requirements/constraints.txt, the same file CI installs). OpenSlide
# comes from the openslide-bin wheel (no system library); the default model is package data; any
# other checkpoint is mounted and chosen by FPROTOSEG_CHECKPOINT.
# Build: docker compose build worker   (or docker build -f docker/worker.Dockerfile .)

# All bases pinned by version tag and digest. The CUDA user-space libraries (cuBLAS, cuDNN, ...)
# come with torch's CUDA wheels, so the small `base` flavour of the CUDA image is enough: it brings
# the driver hooks (NVIDIA_* variables, cuda-compat) without a second 3 GB copy of the libraries.
# Needs an NVIDIA driver that supports CUDA 12.8 (R570 or newer) on the host.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:133c78a0575303be34164d0b90137a042172bdf60696af01a3c424ab402d86e2
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.18@sha256:5713fa8217f92b80223bc83aac7db36ec80a84437dbc0d04bbc659cae030d8c9

FROM ${UV_IMAGE} AS uv

# ---- build: CPython 3.11 (the version CI tests on), torch+CUDA, the package ---------------------
FROM ${CUDA_IMAGE} AS build
# Ubuntu 24.04 ships Python 3.12; a standalone CPython build (relocatable, needs only glibc) keeps
# the worker on the Python the pinned set was tested with.
ARG PYTHON_VERSION=3.11.14
# Must equal the torch pin of requirements/constraints.txt (tests/test_deploy.py checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
 && "$(uv python find "${PYTHON_VERSION}")" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/constraints.txt requirements/
# torch first, from PyTorch's CUDA index as an extra index (pip's own default index serves its
# other dependencies, so no registry is named here), under the same constraints: the pin
# `torch==2.13.0` admits 2.13.0+cu128 here (a local version sorts above the plain one) and 2.13.0+cpu in CI.
RUN pip install "torch==${TORCH_VERSION}" -c requirements/constraints.txt \
      --extra-index-url "${TORCH_INDEX_URL}" \
 && python -c "import torch, sys; sys.exit(torch.version.cuda is None)"
COPY pyproject.toml README.md ./
COPY app app
COPY worker worker
COPY model model
RUN pip install . -c requirements/constraints.txt \
 && pip check \
 && python -c "import openslide, torch; print('openslide', openslide.__library_version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && fprotoseg --help > /dev/null \
 && python -c "import numpy as np, tempfile, fprotoseg.model; from fprotoseg.model.tiny import write_random_tiny_checkpoint as w; \
s = fprotoseg.model.load_segmenter(w(tempfile.mkdtemp() + '/t.safetensors'), device='cpu'); \
assert s.predict(np.zeros((2, 224, 224, 3), np.uint8)).shape[0] == 2"

# ---- runtime: CUDA base + the interpreter + the venv, a non-root user --------------------------
FROM ${CUDA_IMAGE} AS runtime
ARG APP_UID=10001
# Same numeric uid/gid as the API image: both write the shared data volume.
RUN groupadd --system --gid ${APP_UID} fprotoseg \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin fprotoseg \
 && mkdir -p /data /models \
 && chown ${APP_UID}:${APP_UID} /data
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
# The benchmark travels with the image: docker compose run --rm worker python /opt/fprotoseg/bench/gpu.py
COPY bench/gpu.py /opt/fprotoseg/bench/gpu.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FPROTOSEG_DATA_DIR=/data \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER ${APP_UID}:${APP_UID}
WORKDIR /data
CMD ["fprotoseg", "worker"]
