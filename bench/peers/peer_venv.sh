# Sourced by the setup_*.sh scripts: make (once) a peer's own virtual environment, outside the repository, with
# a CPU torch installed first and the peer's packages under a constraint holding that exact torch build.
#   make_peer_venv NAME VENV CHECK_PY SPEC...
# NAME names the peer in the lines printed; CHECK_PY is Python run in the venv afterwards (it imports the peer, so
# the install is usable, not only present, and prints the versions); the environment's PYTHON (default python3.11)
# builds the venv and TORCH_SPEC (default torch==2.13.0, the CPU build this project uses) is the torch installed.
# Idempotent: with the venv already made for this spec it does nothing.
make_peer_venv() {
  local name=$1 venv=$2 check=$3
  shift 3
  local torch_spec=${TORCH_SPEC:-torch==2.13.0}
  local stamp="$venv/.finetune-bench-setup"
  local want="$* $torch_spec"
  if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] && [ -x "$venv/bin/python" ]; then
    echo "$name is set up in $venv" >&2
    return 0
  fi
  echo "setting up $name in $venv (once; a few minutes)..." >&2
  if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    "${PYTHON:-python3.11}" -m venv "$venv"
  fi
  local py="$venv/bin/python"
  local pip=("$py" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade pip
  # torch first and on its own: left to resolve `torch` as one of the peer's dependencies, pip would pull a
  # multi-GB CUDA build.
  "${pip[@]}" "$torch_spec"
  local constraints
  constraints=$(mktemp)
  # The exact build just installed (e.g. 2.13.0+cpu), so no dependency of the peer can swap it.
  "$py" -W ignore -c 'import torch; print(f"torch=={torch.__version__}")' > "$constraints"
  "${pip[@]}" -c "$constraints" "$@"
  rm -f "$constraints"
  "$py" -c "
import sys

import torch

if torch.version.cuda is not None:
    sys.exit(f'error: the $name venv has a CUDA torch ({torch.__version__}, CUDA {torch.version.cuda}); '
             'remove the venv and run again with TORCH_SPEC naming a CPU build')
$check"
  echo "$want" > "$stamp"
}
