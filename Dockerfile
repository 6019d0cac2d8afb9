# One image for every job: the Lambda runtime by default, `worker poll` on ECS.
# Build: docker build -t worker .
# Lambda: use the image as is (CMD runs the Runtime Interface Client).
# ECS:    override the command with ["worker", "poll"].

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
# Dependencies first, from the lock file only, so source edits keep this layer cached.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-install-project --no-editable --extra parquet --extra lake
COPY worker ./worker
COPY lambda_entry.py ./
RUN uv sync --frozen --no-editable --extra parquet --extra lake

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home worker
COPY --from=build /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001
HEALTHCHECK NONE
CMD ["python", "-m", "awslambdaric", "lambda_entry.handler"]
