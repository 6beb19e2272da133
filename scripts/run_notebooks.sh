#!/usr/bin/env bash
# Main job: set up the environment, then execute every notebook headlessly with papermill on the
# toy backbone. Executed copies go to build/notebooks/ (ignored), figures to figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python scripts/run_notebooks.py "$@"
