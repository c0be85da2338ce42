"""Smoke test of bench/teacher_precision.py: both precisions on the same texts, compared."""

from __future__ import annotations

import json

from tests.conftest import DATA, run_bench, tiny_recipe, train_outside_test


def test_teacher_precision_bench_times_both_and_compares_their_outputs(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    teacher = train_outside_test(tmp_path, tiny_recipe(
        tiny_checkpoints["bert"], output_dir=str(tmp_path / "teacher"), training={"max_steps": 4},
        tracking={"log_model": False, "system_metrics": False})).best_dir
    out_json = tmp_path / "precision.json"
    code, out, err = run_bench("teacher_precision", [str(teacher), "--texts", str(DATA / "sst2" / "dev.tsv"),
                                                     "--limit", "48", "--rounds", "2", "--json", str(out_json)],
                               monkeypatch, capsys)
    assert code == 0, err
    assert "| fp32 |" in out and "| bf16 |" in out and "bf16 / fp32 speed-up:" in out
    result = json.loads(out_json.read_text())
    assert result["texts"] == 48 and len(result["seconds"]["fp32"]) == len(result["seconds"]["bf16"]) == 2
    assert 0 < result["max_softened_difference"] < 0.1 and result["top_class_agreement"] > 0.5

    code, _, err = run_bench("teacher_precision", [str(teacher), "--texts", str(DATA / "sst2" / "dev.tsv"),
                                                   "--column", "text"], monkeypatch, capsys)
    assert code != 0 and "--column: 'text' is not a column" in err and "sentence, label" in err
