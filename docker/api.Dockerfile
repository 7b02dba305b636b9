# fprotoseg API image: the HTTP edge only. The API sends Celery tasks *by name* and never imports
# torch or OpenSlide, so this image has neither (about 150 MB instead of several GB): it installs
# requirements/api.txt (a subset of the one pinned set, same versions) and the package itself with
# --no-deps. Every input is a build argument (docs/deploy.md, "Building behind a mirror or a proxy"):
# the base image, the package indexes and CA certificates to trust; the build downloads nothing but
# packages from those indexes.
# Build: docker compose build api   (or docker build -f docker/api.Dockerfile .)

# Base image pinned by version tag and digest (the multi-arch index digest of that tag).
# To move to a newer patch release: docker buildx imagetools inspect python:3.11.X-slim-bookworm
# Another (a site's own registry): any image with CPython 3.11 as `python3` (with venv) and ca-certificates.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- build: a virtual environment with the pinned API dependencies and the package -------------
FROM ${PYTHON_IMAGE} AS build
# Where pip finds packages; pip reads these variables itself. Empty = pip's default index only.
#   PIP_INDEX_URL        an index (a mirror) instead of pip's default one
#   PIP_EXTRA_INDEX_URL  further indexes, space-separated
#   PIP_FIND_LINKS       a page or folder URL listing wheels
#   PIP_TRUSTED_HOST     hosts pip may reach over plain HTTP
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_TRUSTED_HOST=
# PEM certificates to trust during the build besides the base image's (a TLS-intercepting proxy's
# or an internal mirror's CA). Build-time only: the image does not keep them.
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
# Dependencies first: this layer is rebuilt only when the pins change, not on every code edit.
COPY requirements/api.txt requirements/constraints.txt requirements/
RUN pip install -r requirements/api.txt -c requirements/constraints.txt \
 && pip check
COPY pyproject.toml README.md ./
COPY app app
COPY worker worker
COPY model model
# The API never loads a network, but GET /models reads the packaged checkpoints' manifests (their
# headers, without torch), so the weights travel here too (about 15 MB each).
RUN pip install --no-deps . \
 && fprotoseg --help > /dev/null \
 && ! python -c "import torch" 2> /dev/null

# ---- runtime: the venv on the same slim base, a non-root user, nothing else ---------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
# One numeric uid/gid shared with the worker image, so both can write the shared data volume.
RUN groupadd --system --gid ${APP_UID} fprotoseg \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin fprotoseg \
 && mkdir -p /data \
 && chown ${APP_UID}:${APP_UID} /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FPROTOSEG_DATA_DIR=/data
USER ${APP_UID}:${APP_UID}
WORKDIR /data
EXPOSE 8000
# /healthz answers when the process is up; /readyz (broker, storage, a worker) is for load balancers.
# No curl in a slim image: the standard library does the request.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["fprotoseg", "serve", "--host", "0.0.0.0", "--port", "8000"]
