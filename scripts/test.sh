#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (about 6 minutes on 2 CPU cores).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The suite never touches the network: checkpoints and data are built or shipped locally.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
