"""`bench/serve_ceiling.py --quick` serves this tree and a baseline tree (HEAD, extracted with git archive) around the
constant-time model and prints both and their ratio (no figure is asserted: benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_bench

pytestmark = pytest.mark.e2e


def test_quick_ceiling_benchmark_serves_both_trees_and_prints_the_ratio(tmp_path):
    if subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: there is no baseline commit to extract")
    report = tmp_path / "ceiling.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_ceiling.py"), "--quick", "--baseline-ref",
                             "HEAD", "--json", str(report)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = {(line[:18].strip(), line[18:].split()[0]) for line in out.splitlines() if line.startswith(("baseline", "this tree"))}
    assert rows == {(f"baseline {head}", "4"), (f"baseline {head}", "16"), ("this tree", "4"), ("this tree", "16")}, out
    assert "ratio at 16 clients: throughput" in out and f"(this tree / baseline {head})" in out, out
    assert "command: python bench/serve_ceiling.py --quick" in out
    saved = json.loads(report.read_text())
    for tree in ("this tree", f"baseline {head}"):
        for level in saved["results"][tree]:
            assert level["rps"] > 0 and level["errors"] == 0
            if sys.platform == "linux":
                assert level["cpu_us_per_request"] > 0  # the server process's CPU, from /proc
    assert [r["concurrency"] for r in saved["ratios"]] == [4, 16]


def test_a_baseline_that_is_not_a_commit_is_named(monkeypatch, capsys):
    code, out, err = run_bench("serve_ceiling", ["--quick", "--baseline-ref", "no-such-ref"], monkeypatch, capsys)
    assert code != 0 and "--baseline-ref 'no-such-ref' is not a commit of this repository" in err + out


def test_the_launcher_refuses_a_tree_its_packages_do_not_come_from(tmp_path, monkeypatch, capsys):
    code, out, err = run_bench("serve_ceiling", ["--launch", str(tmp_path), "--", "--port", "1"], monkeypatch, capsys)
    assert code == 2 and f"not from {tmp_path}" in err
