#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (about 15 minutes on 2 CPU cores).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
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
exec .venv/bin/python -m pytest "$@"
