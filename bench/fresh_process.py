"""One variant of a micro-benchmark in a process of its own, so that no peak, allocator cache or kernel set-up of
one variant carries over to the next (peak RSS in particular only ever grows within a process)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_worker(script: str, *args: str) -> dict:
    """Run `python SCRIPT --worker ARGS...` and return the JSON object its last line of output holds."""
    done = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} --worker {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
