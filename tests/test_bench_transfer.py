"""`bench/transfer.py --quick` runs every section end to end on a tiny model (no figure is asserted beyond what the
knobs guarantee: benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_bench

pytestmark = pytest.mark.e2e


def test_quick_transfer_benchmark_runs_every_section(tmp_path, monkeypatch, capsys):
    report = tmp_path / "bench.json"
    code, out, err = run_bench("transfer", ["--quick", "--json", str(report)], monkeypatch, capsys)  # in this process
    assert code == 0, out[-3000:] + err[-3000:]
    assert "command: python bench/transfer.py --quick" in out and "machine:" in out and "date:" in out
    for heading in ("| way | dev accuracy | trainable parameters |", "| start | dev accuracy |",
                    "| loss | macro-F1 | micro-F1 |", "| data | ECE before | ECE after |",
                    "| way | pooling | dev accuracy |"):
        assert heading in out, out
    saved = json.loads(report.read_text())["results"]
    knobs = {key.split("/")[1]: runs for key, runs in saved["knobs"].items()}
    trainable = {way: runs[0]["metrics"]["model/trainable_parameters"] for way, runs in knobs.items()}
    assert trainable["linear-probe"] < trainable["lora-r8"] < trainable["frozen-embeddings"] < trainable["full"]
    size = {way: runs[0]["metrics"]["model/saved_weights_mb"] for way, runs in knobs.items()}
    assert size["lora-r8"] < 0.2 * size["full"]
    assert len(knobs["full"]) == 2 and {r["overrides"][1] for r in knobs["full"]} == {"training.seed=1", "training.seed=2"}
    assert all("calibration/ece_after" in r["metrics"] for r in knobs["full"])
    assert set(saved["imbalance"]) == {"plain", "balanced", "focal"}
    journal = [json.loads(line) for line in (tmp_path / "bench.json.jsonl").read_text().splitlines()]
    assert len(journal) == len(set(r["run_id"] for r in journal)) and journal[0]["metrics"] == knobs["full"][0]["metrics"]
    pooled = {key.split("/", 1)[1]: runs for key, runs in saved["pooling"].items()}
    assert set(pooled) == {"full/first", "full/mean", "linear-probe/first", "linear-probe/mean"}
    assert all("model.pooling=mean" in r["overrides"] for r in pooled["full/mean"] + pooled["linear-probe/mean"])
    parent = saved["transfer"]["parent"]["best_dir"]
    assert all(f"model.checkpoint={parent}" in r["overrides"] for r in saved["transfer"]["from_parent"])


def test_unknown_section_is_refused():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "transfer.py"), "--sections", "knobs,speed"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown section(s) speed" in done.stderr
