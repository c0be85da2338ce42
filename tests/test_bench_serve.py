"""`bench/serve.py --quick` runs end to end on a tiny trained model (no timing is asserted: benchmarks are not tests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_recipe, train_outside_test

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoints, tmp_path_factory):
    """A tiny classifier trained for a few steps; its best folder is what `finetune serve` loads."""
    root = tmp_path_factory.mktemp("bench")
    return train_outside_test(root, tiny_recipe(
        tiny_checkpoints["bert"], output_dir=str(root / "run"),
        tracking={"log_model": False, "system_metrics": False, "experiment": "bench"})).best_dir


def test_quick_benchmark_runs_the_baseline_and_finetune_on_an_onnx_export(tiny_model, tmp_path):
    """The baseline and `finetune serve` on an int8 ONNX export the benchmark makes itself, each with its accuracy
    and the ratio between them. The other backends are the same code with another flag, and each is tested in
    tests/test_serving.py and tests/test_export.py."""
    servers = {"baseline", "onnx-int8"}
    report = tmp_path / "bench.json"
    # Without infinity's venv, whether or not this machine has one (tests/test_bench_serve_peer.py covers it).
    env = {**os.environ, "INFINITY_VENV": str(tmp_path / "no-infinity")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--model", str(tiny_model), "--json", str(report),
         "--accuracy-sentences", "16", "--servers", ",".join(sorted(servers))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.split("\nthe first")[0].splitlines()]  # the load table
    for server in servers:
        assert {row[1] for row in rows if row and row[0] == server} == {"1", "4"}, result.stdout
    assert "ratio at 4 clients: throughput" in result.stdout
    assert "(onnx-int8 / baseline)" in result.stdout, result.stdout
    assert "torch" in result.stdout and "command: python bench/serve.py --quick" in result.stdout
    assert "the first 8 requests after /readyz, one at a time (cold), then the same 8 again (warm):" in result.stdout
    saved = json.loads(report.read_text())
    for server in servers:
        first = saved["first_requests"][server]
        assert first["requests"] == 8 and 0 < first["warm_mean_ms"] and first["cold_over_warm"] > 0
    assert set(saved["accuracy"]) == servers
    assert all(0 <= a <= 1 for a in saved["accuracy"].values())
    assert not (tiny_model / "model.onnx").exists()  # the export went to a temporary folder, not the model


def test_unknown_server_is_refused(tiny_model):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--model", str(tiny_model), "--servers", "tensorrt"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown server(s) tensorrt" in result.stderr


def test_quick_soak_runs_and_passes(tiny_model):
    """`bench/soak.py --quick`: mixed valid and invalid load beside disconnecting, slow and large-string clients;
    no 5xx (the server counts none either), right answers, /healthz p99 under 1 s, bounded memory."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--model", str(tiny_model)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "5xx: 0; wrong or failed answers: 0" in out and "server counted: 0 5xx" in out
    assert "invalid 4" in out and "valid 200" in out
    ran = {line.strip().rsplit(": ", 1)[0]: int(line.rsplit(": ", 1)[1]) for line in out.splitlines()
           if line.startswith("  ") and line.rsplit(": ", 1)[-1].isdigit()}
    for kind in ["disconnect mid-body", "disconnect after the body", "slow head 408", "slow body 408", "large 200",
                 "large 422"]:
        assert ran.get(kind, 0) > 0, (kind, out)
    assert int(re.search(r"(\d+) 499 \(client gone\)", out).group(1)) > 0, out
    p99 = float(re.search(r"/healthz: \d+ probes, p99 ([\d.]+) s", out).group(1))
    assert p99 < 1.0, out
