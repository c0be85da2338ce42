#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (about 20 minutes on 2 CPU cores).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x, or scripts/test.sh tests/test_recipe.py -n 0
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# tests/test_deploy.py runs a real PostgreSQL as MLflow's backend store; Debian's server binaries are not
# something pip can install, so as root (CI) fetch them with apt, and otherwise say why that test skips.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's postgresql for tests/test_deploy.py (once)..." >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } ||
      echo "note: installing postgresql failed: the PostgreSQL-backed deployment test will be skipped" >&2
  else
    echo "note: PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb) and not root with" \
      "apt-get: the PostgreSQL-backed deployment test will be skipped (apt-get install postgresql to run it)" >&2
  fi
fi
# tests/test_playground.py drives the page at GET / in a real browser: Debian's chromium and its chromedriver
# (a browser is not a pip package either), installed the same way; without them that test is skipped.
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium and chromium-driver for tests/test_playground.py (once)..." >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
      echo "note: installing chromium failed: the browser test of the playground page will be skipped" >&2
  else
    echo "note: chromium and chromedriver not found and not root with apt-get: the browser test of the" \
      "playground page will be skipped (apt-get install chromium chromium-driver to run it)" >&2
  fi
fi
# The suite never touches the network: checkpoints and data are built or shipped locally.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two pytest-xdist workers (FINETUNE_TEST_WORKERS): a third of the suite's time is process start-up, file I/O and
# waiting on servers, which the second worker fills (2 cores: 18.5 min, where one process would take about 29). Tests
# of one module stay on one worker (--dist loadscope), so its module fixtures train once. `-n 0`: one process.
parallel=(-n "${FINETUNE_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder)  # in the order conftest.py sets
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
fi
# The whole suite: the tests that measure other processes' load on the cores run afterwards, alone.
.venv/bin/python -m pytest "${parallel[@]}" -m "not quiet_machine"
exec .venv/bin/python -m pytest -m quiet_machine
