# syntax=docker/dockerfile:1.7
# Image of the operator tools (topic creation, migrations) run as one-shot jobs by docker-compose.yml
# and the Helm chart's hooks. Build context: the repository root.
#   docker build -f deploy/docker/tools.Dockerfile -t data-processing/tools .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ghcr.io/astral-sh/uv:0.8 AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY shared/pyproject.toml shared/
COPY service-normalization/pyproject.toml service-normalization/
COPY service-enrichment/pyproject.toml service-enrichment/
COPY service-aggregation/pyproject.toml service-aggregation/
COPY service-projection/pyproject.toml service-projection/
COPY scripts/pyproject.toml scripts/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --package dataproc-tools --no-install-workspace
# dataproc-tools depends on the shared library and on services (benchmarks): every member's code.
COPY shared/src shared/src
COPY service-normalization/src service-normalization/src
COPY service-enrichment/src service-enrichment/src
COPY service-aggregation/src service-aggregation/src
COPY service-projection/src service-projection/src
COPY scripts/src scripts/src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --package dataproc-tools --no-editable

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 dataproc \
    && useradd --system --uid 10001 --gid dataproc --no-create-home --shell /usr/sbin/nologin dataproc
COPY --from=build --chown=root:root /app/.venv /app/.venv
COPY --chown=root:root migrations /app/migrations
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001:10001
CMD ["python", "-m", "dptools.topics", "list"]
