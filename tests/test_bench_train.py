"""`bench/train.py --quick` runs the three ways end to end (no timing is asserted: benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_bench

pytestmark = pytest.mark.e2e


def test_quick_training_benchmark_runs_every_way_over_two_seeds(tmp_path, monkeypatch, capsys):
    """Every way, each trained twice on the same data subset: the subset stays seed 42, the runs train with seeds
    7 and 8, and the figures are their means. max_length 32, as (a) pads every sentence to it: a short smoke run."""
    report = tmp_path / "bench.json"
    code, out, err = run_bench("train", ["--quick", "--repeats", "2", "--max-length", "32", "--first-training-seed", "7",
                                         "--json", str(report)], monkeypatch, capsys)  # main() in this process
    assert code == 0, out + err
    for way in ("(a) Trainer, padding to max_length", "(b) Trainer, dynamic padding", "(c) finetune"):
        assert way in out, out
    assert "ratio (c)/(a): samples/s" in out and "ratio (c)/(b): samples/s" in out
    assert "fp32 matmul peak (torch.mm, measured now)" in out and "command: python bench/train.py --quick" in out
    assert "each way trained 2 times (seeds 7..8)" in out and "seeded subset, seed 42" in out
    saved = json.loads(report.read_text())
    # On a CPU where finetune trains in bf16 by default, (d) gives the Trainer bf16 too.
    if saved["results"]["c"]["precision"] == "bf16" and not saved["machine"]["gpu"]:
        assert "(d) Trainer, dynamic padding, bf16 autocast (--bf16)" in out and "ratio (c)/(d): samples/s" in out
    for way in saved["results"]:
        r = saved["results"][way]
        assert r["samples_per_s"] > 0 and r["real_tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert 0 <= r["dev_accuracy"] <= 1 and r["steps"] == 4  # 128 sentences, batch 32, one epoch
        assert len(r["dev_accuracies"]) == 2 and r["dev_accuracy"] == pytest.approx(sum(r["dev_accuracies"]) / 2)
    c = saved["results"]["c"]
    assert c["training"]["group_by_length"] is True and c["training"]["seed"] == 7  # the first repeat's recipe


def test_unknown_way_is_refused():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--quick", "--ways", "b,z"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown way(s) z" in result.stderr
