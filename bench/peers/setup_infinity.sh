#!/usr/bin/env bash
# Create (once) the virtual environment bench/serve.py runs the infinity-emb peer server from
# (servers infinity-torch and infinity-optimum). It is infinity's own venv, outside the repository:
# infinity pins numpy<2, sentence-transformers<4, typer 0.12, click<8.2..., which would fight the project's
# .venv. Idempotent: with the venv already made for this spec it does nothing.
#   INFINITY_VENV  where to make it (default ${XDG_CACHE_HOME:-$HOME/.cache}/finetune-bench/infinity-venv;
#                  bench/serve.py reads the same variable)
#   PYTHON         interpreter to build it from (default python3.11)
#   TORCH_SPEC     torch requirement installed first (default torch==2.13.0, the CPU build this project
#                  uses); infinity is then installed under a constraint holding that exact torch
set -euo pipefail
VENV=${INFINITY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-bench/infinity-venv}
# server: the HTTP server; torch: the torch engine (sentence-transformers); optimum: the ONNX engine.
SPEC="infinity-emb[server,torch,optimum]==0.0.78"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.finetune-bench-setup"
want="$SPEC $TORCH_SPEC"
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] && [ -x "$VENV/bin/infinity_emb" ]; then
  echo "infinity is set up in $VENV" >&2
  exit 0
fi
echo "setting up infinity in $VENV (once; a few minutes)..." >&2
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "${PYTHON:-python3.11}" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch first and on its own: left to resolve `torch` as one of infinity's dependencies, pip would pull a
# multi-GB CUDA build.
"${pip[@]}" "$TORCH_SPEC"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# The exact build just installed (e.g. 2.13.0+cpu), so no dependency of infinity can swap it.
"$py" -W ignore -c 'import torch; print(f"torch=={torch.__version__}")' > "$constraints"
"${pip[@]}" -c "$constraints" "$SPEC"
"$py" - <<'PY'
import sys

import torch

if torch.version.cuda is not None:
    sys.exit(f"error: the infinity venv has a CUDA torch ({torch.__version__}, CUDA {torch.version.cuda}); "
             "remove the venv and run again with TORCH_SPEC naming a CPU build")
import infinity_emb  # noqa: F401  (the install is usable, not only present)
import optimum.onnxruntime  # noqa: F401

print(f"infinity-emb {infinity_emb.__version__}, torch {torch.__version__} (CPU)")
PY
echo "$want" > "$stamp"
