"""bench/korean.py's smoke run: the three ways (as-is, MLM, vocabulary + MLM) on the shipped Korean sample."""

from __future__ import annotations

from tests.conftest import run_bench


def test_quick_korean_benchmark_runs_the_three_ways(tiny_checkpoints, monkeypatch, capsys, tmp_path):
    code, out, err = run_bench("korean", ["--quick", "--checkpoint", str(tiny_checkpoints["bert"]),
                                          "--workdir", str(tmp_path), "--json", str(tmp_path / "result.json")],
                               monkeypatch, capsys)
    assert code == 0, err[-3000:]
    import json

    rows = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert set(rows) == {"a", "b", "c"}
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows.values())
    # (b) fine-tunes with the checkpoint's own vocabulary, (c) with the adapted one, which replaced the [UNK]s (the
    # tiny vocabulary has no jamo: each Korean word was one [UNK] before).
    assert rows["a"]["pieces_per_review"] == rows["b"]["pieces_per_review"] != rows["c"]["pieces_per_review"]
    vocabulary = rows["c"]["vocabulary"]
    assert vocabulary["pieces_added"] > 0 and vocabulary["after"]["unk_share"] < vocabulary["before"]["unk_share"]
    assert set(rows["c"]["seconds"]) == {"vocabulary", "pretraining", "fine-tuning"}
    assert "| (c) MiniLM + vocabulary adaptation + MLM |" in out
