#!/usr/bin/env bash
# Create .venv with CPU PyTorch and gradwatch (server + dev extras), editable. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.gradwatch-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first and pinned: the local CPU wheel, not the registry's multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==${GRADWATCH_TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install -q -e ".[server,dev]"
    echo "$want" > "$stamp"
fi
