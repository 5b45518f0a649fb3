#!/usr/bin/env bash
# Set-up plus the main job on the embedded default: fetch the emoji set, convert it, train
# IDML-FastAP on a local Ray instance (Ray Data -> Ray Train, MLflow in ./mlflow.db),
# evaluate the best (validation-selected) checkpoint on the test split.
# Extra arguments go to `idml train`, e.g. bash scripts/demo.sh --set train.epochs=2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/idml data fetch emoji
exec .venv/bin/idml train --ray --config configs/emoji.yaml "$@"
