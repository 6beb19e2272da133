#!/usr/bin/env bash
# Whole test suite (library tests and every notebook under papermill with fast parameters).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q "$@"
