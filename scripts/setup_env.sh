#!/usr/bin/env bash
# Create ./.venv (Python 3.11+) with the pinned CPU build of torch and the project installed.
# Idempotent: re-running only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.osa-lab-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first and pinned: this version is the CPU build; an unpinned torch pulls CUDA (GBs).
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    .venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
    echo "$want" > "$stamp"
fi
