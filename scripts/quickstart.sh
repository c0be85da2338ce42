#!/usr/bin/env bash
# Set up if needed, then fine-tune the quickstart recipe (offline MiniLM on the shipped SST-2 sample).
# Extra arguments are recipe overrides, e.g. scripts/quickstart.sh training.num_epochs=2
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/finetune run recipes/quickstart.yaml "$@"
