#!/usr/bin/env bash
# Create (once) the virtual environment bench/fewshot.py runs the SetFit peer from (bench/peers/setfit_run.py).
# It is SetFit's own venv, outside the repository: SetFit 1.2 needs transformers 4 (its trainer imports what
# transformers 5 removed), and sentence-transformers and huggingface_hub versions of that generation, which would
# fight the project's .venv. Idempotent: with the venv already made for this spec it does nothing.
#   SETFIT_VENV  where to make it (default ${XDG_CACHE_HOME:-$HOME/.cache}/finetune-bench/setfit-venv;
#                bench/fewshot.py reads the same variable)
#   PYTHON       interpreter to build it from (default python3.11)
#   TORCH_SPEC   torch requirement installed first (default torch==2.13.0, the CPU build this project uses);
#                SetFit is then installed under a constraint holding that exact torch
set -euo pipefail
VENV=${SETFIT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-bench/setfit-venv}
SPEC=(setfit==1.2.0 "transformers>=4.41,<5" "sentence-transformers>=3,<5.2" "huggingface_hub>=0.24,<1")
# shellcheck source=bench/peers/peer_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/peer_venv.sh"
make_peer_venv setfit "$VENV" '
import sentence_transformers
import setfit
import transformers

print(f"setfit {setfit.__version__}, sentence-transformers {sentence_transformers.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__} (CPU)")
' "${SPEC[@]}"
