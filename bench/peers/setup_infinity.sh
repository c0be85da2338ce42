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
# shellcheck source=bench/peers/peer_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/peer_venv.sh"
make_peer_venv infinity "$VENV" '
import infinity_emb  # the install is usable, not only present
import optimum.onnxruntime

print(f"infinity-emb {infinity_emb.__version__}, torch {torch.__version__} (CPU)")' "$SPEC"
