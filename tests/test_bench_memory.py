"""Smoke tests of the memory benchmarks: bench/activation_memory.py, bench/mlm_head.py and bench/memory.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import DATA, run_bench, tiny_recipe, write_recipe


def test_activation_memory_bench_measures_each_variant_in_its_own_process(monkeypatch, capsys, tmp_path):
    out_json = tmp_path / "activation.json"
    code, out, err = run_bench("activation_memory", ["--variants", "attention_dropout=0,default", "--batch", "2",
                                                     "--length", "16", "--steps", "2", "--json", str(out_json)],
                               monkeypatch, capsys)
    assert code == 0, err
    assert "| the checkpoint's attention dropout (0.1) |" in out and "| model.attention_dropout: 0 |" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["attention_dropout=0", "default"]
    assert all(r["peak_over_base_mb"] >= 0 and r["step_s"] > 0 for r in rows)

    code, _, err = run_bench("activation_memory", ["--variants", "default,flash"], monkeypatch, capsys)
    assert code == 2 and "--variants: unknown flash; allowed: default, attention_dropout=0, gradient_checkpointing" in err



def test_mlm_head_bench_runs_both_heads_on_the_same_batch(monkeypatch, capsys, tmp_path):
    out_json = tmp_path / "mlm.json"
    code, out, err = run_bench("mlm_head", ["--batch", "2", "--length", "16", "--steps", "2", "--json", str(out_json)],
                               monkeypatch, capsys)
    assert code == 0, err
    assert "| every position (transformers' own masked-LM model, given the labels) |" in out
    assert "| masked positions only (finetune) |" in out
    full, masked = json.loads(out_json.read_text())["rows"]
    assert (full["variant"], masked["variant"]) == ("full", "masked")
    assert masked["loss"] == pytest.approx(full["loss"], rel=1e-4)  # the same loss, computed on fewer rows
    assert all(r["step_s"] > 0 for r in (full, masked))


def test_mlm_head_bench_on_another_family_computes_the_same_loss(monkeypatch, capsys, tmp_path):
    out_json = tmp_path / "mlm.json"
    code, out, err = run_bench("mlm_head", ["--family", "modernbert", "--batch", "2", "--length", "16", "--steps", "2",
                                            "--json", str(out_json)], monkeypatch, capsys)
    assert code == 0, err
    assert "modernbert masked-LM model at MiniLM's size (6 x 384), 50,368-piece vocabulary" in out
    full, masked = json.loads(out_json.read_text())["rows"]
    assert masked["loss"] == pytest.approx(full["loss"], rel=1e-4)

@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="bench/memory.py measures under /usr/bin/time -v")
def test_memory_bench_reports_the_peak_and_the_test_split_of_a_run(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    dev = str(DATA / "sst2" / "dev.tsv")
    recipe = tiny_recipe(tiny_checkpoints["bert"], name="tiny-memory",
                         data={"files": {"train": str(DATA / "sst2" / "train.tsv"), "validation": dev, "test": dev},
                               "test_split": "test"},
                         training={"batch_size": 8})
    path = write_recipe(tmp_path / "tiny-memory.yaml", recipe, "finetune run tiny-memory.yaml")
    out_json = tmp_path / "memory.json"
    # Overrides after the options, as the bench's own examples write them.
    code, out, err = run_bench("memory", [str(path), "--multiples", "16", "--json", str(out_json), "training.max_steps=3"],
                               monkeypatch, capsys)
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["pad_to_multiple_of"] for r in rows] == [16] and rows[0]["overrides"] == ["training.max_steps=3"]
    assert all(0.1 < r["peak_gib"] < 24 and "accuracy" in r["metrics"] and "accuracy" in r["test_metrics"] for r in rows)
    assert "pad_to_multiple_of=16: peak " in out and "; test: accuracy " in out
