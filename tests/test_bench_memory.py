"""Smoke test of bench/activation_memory.py: each variant in its own process, a table with one row each."""

from __future__ import annotations

import json

from tests.conftest import run_bench


def test_activation_memory_bench_measures_each_variant_in_its_own_process(monkeypatch, capsys, tmp_path):
    out_json = tmp_path / "activation.json"
    code, out, err = run_bench("activation_memory", ["--variants", "default,attention_dropout=0", "--batch", "2",
                                                     "--length", "16", "--steps", "2", "--json", str(out_json)],
                               monkeypatch, capsys)
    assert code == 0, err
    assert "| the checkpoint's attention dropout (0.1) |" in out and "| model.attention_dropout: 0 |" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["default", "attention_dropout=0"]
    assert all(r["peak_over_base_mb"] >= 0 and r["step_s"] > 0 for r in rows)

    code, _, err = run_bench("activation_memory", ["--variants", "default,flash"], monkeypatch, capsys)
    assert code == 2 and "--variants: unknown flash; allowed: default, attention_dropout=0, gradient_checkpointing" in err
