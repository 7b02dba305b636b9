# fprotoseg worker image: a Celery worker (`fprotoseg worker`) that runs whole-slide jobs, in two
# flavours built from this one file (build argument WORKER_FLAVOUR):
#   gpu (default)  torch's CUDA build, for one NVIDIA GPU per worker; what docker-compose.yml builds
#   cpu            torch's CPU build, for hosts without a GPU and for tests (docker/smoke.sh)
# The project is installed with the one pinned dependency set (requirements/constraints.txt, the
# same file CI installs). OpenSlide comes from the openslide-bin wheel (no system library); the
# default model is package data; any other checkpoint is mounted and chosen by FPROTOSEG_CHECKPOINT.
#
# Every input is a build argument (docs/deploy.md, "Building behind a mirror or a proxy"): the base
# image, the package indexes, torch's index, local wheels and CA certificates to trust. The build
# downloads nothing but packages from those indexes: no interpreter, no OS package.
# Build: docker compose build worker   (or docker build -f docker/worker.Dockerfile .)
#        docker build -f docker/worker.Dockerfile --build-arg WORKER_FLAVOUR=cpu .   (CPU flavour)

# The base of both stages, and so the Python the worker runs: CPython 3.11.14 (the version CI tests
# on) on Debian bookworm, the same image as the API's, pinned by version tag and digest. Another
# (a site's own registry): any image with CPython 3.11 as `python3` (with venv) and ca-certificates.
# The CUDA user-space libraries (cuBLAS, cuDNN, ...) come with torch's CUDA wheels and the NVIDIA
# Container Toolkit mounts the driver, so the GPU flavour needs no CUDA base image.
ARG WORKER_BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
# gpu | cpu
ARG WORKER_FLAVOUR=gpu

# ---- build: a virtual environment with torch and the package ---------------------------------------
FROM ${WORKER_BASE_IMAGE} AS build
ARG WORKER_FLAVOUR
# Must equal the torch pin of requirements/constraints.txt (tests/test_deploy.py checks it).
ARG TORCH_VERSION=2.13.0
# Where pip finds packages; pip reads these variables itself. Empty = pip's default index only.
#   PIP_INDEX_URL        an index (a mirror) instead of pip's default one
#   PIP_EXTRA_INDEX_URL  further indexes, space-separated
#   PIP_FIND_LINKS       a page or folder URL listing wheels (e.g. a local wheelhouse served over HTTP)
#   PIP_TRUSTED_HOST     hosts pip may reach over plain HTTP
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_TRUSTED_HOST=
# A further index for the torch install only: PyTorch's own index of one CUDA version (gpu) or of
# CPU builds (cpu), or its mirror. Empty: torch comes from the indexes above; there, the default
# index's torch 2.13.0 for Linux is a CUDA (13.0) build and the cpu flavour needs 2.13.0+cpu.
ARG TORCH_INDEX_URL=
# PEM certificates to trust during the build besides the base image's (a TLS-intercepting proxy's
# or an internal mirror's CA). Build-time only: the images do not keep them.
ARG CA_CERTS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv \
 && trusted="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" \
 && if [ ! -f "$trusted" ]; then \
      trusted="$(/opt/venv/bin/python -c 'from pip._vendor import certifi; print(certifi.where())')"; fi \
 && cat "$trusted" > /opt/build-ca.pem \
 && if [ -n "$CA_CERTS" ]; then printf '%s\n' "$CA_CERTS" >> /opt/build-ca.pem; fi
ENV PATH=/opt/venv/bin:$PATH \
    PIP_CERT=/opt/build-ca.pem
WORKDIR /src
COPY requirements/constraints.txt requirements/
# torch first, under the same constraints: the pin `torch==2.13.0` admits a CUDA build here
# (2.13.0 or 2.13.0+cuXYZ: a local version sorts above the plain one) and 2.13.0+cpu in CI and in
# the cpu flavour, which asks for +cpu so that it fails rather than fetch the CUDA build.
RUN case "$WORKER_FLAVOUR" in \
      gpu) torch="torch==${TORCH_VERSION}"; want_cuda=1 ;; \
      cpu) torch="torch==${TORCH_VERSION}+cpu"; want_cuda=0 ;; \
      *) echo "WORKER_FLAVOUR must be gpu or cpu, not '${WORKER_FLAVOUR}'" >&2; exit 2 ;; \
    esac \
 && pip install "$torch" -c requirements/constraints.txt \
      ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
 && python -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
sys.exit((torch.version.cuda is not None) != bool($want_cuda))"
COPY pyproject.toml README.md ./
COPY app app
COPY worker worker
COPY model model
RUN pip install . -c requirements/constraints.txt \
 && pip check \
 && python -c "import openslide, torch; print('openslide', openslide.__library_version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && fprotoseg --help > /dev/null \
 && python -c "import numpy as np, tempfile, fprotoseg.model; from fprotoseg.model.networks.tiny import write_random_tiny_checkpoint as w; \
s = fprotoseg.model.load_segmenter(w(tempfile.mkdtemp() + '/t.safetensors'), device='cpu'); \
assert s.predict(np.zeros((2, 224, 224, 3), np.uint8)).shape[0] == 2"

# ---- runtime: the same base + the venv, a non-root user ------------------------------------------
FROM ${WORKER_BASE_IMAGE} AS runtime
ARG WORKER_FLAVOUR
ARG APP_UID=10001
# Same numeric uid/gid as the API image: both write the shared data volume.
RUN groupadd --system --gid ${APP_UID} fprotoseg \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin fprotoseg \
 && mkdir -p /data /models \
 && chown ${APP_UID}:${APP_UID} /data
COPY --from=build /opt/venv /opt/venv
# The benchmark travels with the image: docker compose run --rm worker python /opt/fprotoseg/bench/gpu.py
COPY bench/gpu.py /opt/fprotoseg/bench/gpu.py
LABEL io.fprotoseg.worker-flavour="${WORKER_FLAVOUR}"
# NVIDIA_DRIVER_CAPABILITIES: what the NVIDIA Container Toolkit mounts from the host driver.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FPROTOSEG_DATA_DIR=/data \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER ${APP_UID}:${APP_UID}
WORKDIR /data
CMD ["fprotoseg", "worker"]
