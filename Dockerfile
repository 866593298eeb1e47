# syntax=docker/dockerfile:1
# hmaopt images: one file, two targets (docs/deployment.md; docker-compose.yml builds both).
#
#   api     control plane: `hmaopt serve`, `hmaopt db upgrade`, `hmaopt token ...`. No torch.
#           docker build --target api -t hmaopt-api .
#   worker  data plane: `hmaopt worker --device cuda:N`. torch (CUDA build) + the worker extra.
#           docker build --target worker -t hmaopt-worker .
#
# The worker target does not derive from the api target: it has no HEALTHCHECK (a worker
# serves no HTTP) and its torch layer is built before the source is copied, so a code change
# does not reinstall torch.

ARG PYTHON_VERSION=3.11

# ------------------------------------------------------------------------------------ base
FROM python:${PYTHON_VERSION}-slim AS base
ARG APP_UID=10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# A non-root user. The mount points exist in the image and belong to it, so that a named
# volume mounted there starts with that ownership (a host folder must be chowned to APP_UID).
RUN groupadd --system --gid "${APP_UID}" hmaopt \
 && useradd --system --uid "${APP_UID}" --gid hmaopt --create-home --home-dir /home/hmaopt hmaopt \
 && mkdir -p /models /data /cache \
 && chown hmaopt:hmaopt /models /data /cache
# The build folder: `pip install .` installs service/, workers/ and migrations/ (the Alembic
# scripts `hmaopt db upgrade` runs) into site-packages; /app stays root-owned.
WORKDIR /app

# ------------------------------------------------------------------------------------- api
FROM base AS api
COPY . /app
# The control plane only: the package without extras pulls no torch.
RUN pip install .
USER hmaopt
EXPOSE 8000
# Liveness (no auth). The slim image has no curl: urlopen raises on a refused connection or
# an HTTP error status, so the check exits non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["hmaopt", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]

# ---------------------------------------------------------------------------------- worker
FROM base AS worker
# torch FIRST, pinned (the Makefile's pin). On Linux the default torch wheel is a CUDA build
# that carries its CUDA libraries: the host needs only the NVIDIA driver and the NVIDIA
# Container Toolkit. For another CUDA build, pass PyTorch's index for it:
#   docker build --target worker --build-arg TORCH_INDEX_URL=<index of that CUDA build> .
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
COPY . /app
# The package with the worker extra; the torch pin is repeated so that no dependency can
# replace the torch installed above.
RUN pip install ".[worker]" "torch==${TORCH_VERSION}"
USER hmaopt
CMD ["hmaopt", "worker", "--device", "cuda:0"]
