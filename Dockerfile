# syntax=docker/dockerfile:1
# Two targets: `server` (FastAPI + PostgreSQL driver, no torch) and `trainer` (CPU torch + the
# client hook, for the compose `demo` profile).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY client_hook ./client_hook
COPY templates ./templates
COPY static ./static
COPY migrations ./migrations
RUN useradd --create-home --uid 10001 gradwatch

FROM base AS server
# The server's dependencies come from pyproject's `server` extra; `--no-deps .` then installs
# gradwatch itself without the base dependency on torch, which the server never imports.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['server']))" > /tmp/server-requirements.txt \
    && pip install -r /tmp/server-requirements.txt \
    && pip install --no-deps . \
    && rm -rf /src /tmp/server-requirements.txt
USER gradwatch
WORKDIR /home/gradwatch
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"]
# `serve` applies the Alembic migrations before it starts listening, then forks the workers.
CMD ["gradwatch", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]

FROM base AS trainer
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install . \
    && rm -rf /src
USER gradwatch
WORKDIR /home/gradwatch
CMD ["gradwatch", "train", "--dataset", "cmapss", "--method", "gradnorm"]
