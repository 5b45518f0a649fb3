#!/usr/bin/env bash
# Set-up, the layer contracts, then the whole test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lint-imports  # [tool.importlinter] in pyproject.toml
exec .venv/bin/python -m pytest "$@"
