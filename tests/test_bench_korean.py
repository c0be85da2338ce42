"""bench/korean.py's smoke run: the four ways (as-is, MLM, vocabulary + MLM, vocabulary alone) on the shipped Korean
sample."""

from __future__ import annotations

from tests.conftest import run_bench


def test_quick_korean_benchmark_runs_the_four_ways(tiny_checkpoints, monkeypatch, capsys, tmp_path):
    code, out, err = run_bench("korean", ["--quick", "--checkpoint", str(tiny_checkpoints["bert"]),
                                          "--workdir", str(tmp_path), "--json", str(tmp_path / "result.json")],
                               monkeypatch, capsys)
    assert code == 0, err[-3000:]
    import json

    rows = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert set(rows) == {"a", "b", "c", "d"}
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows.values())
    # (b) fine-tunes with the checkpoint's own vocabulary, (c) with the adapted one, which replaced the [UNK]s (the
    # tiny vocabulary has no jamo: each Korean word was one [UNK] before).
    assert rows["a"]["pieces_per_review"] == rows["b"]["pieces_per_review"] != rows["c"]["pieces_per_review"]
    vocabulary = rows["c"]["vocabulary"]
    assert vocabulary["pieces_added"] > 0 and vocabulary["after"]["unk_share"] < vocabulary["before"]["unk_share"]
    assert set(rows["c"]["seconds"]) == {"vocabulary", "pretraining", "fine-tuning"}
    # (d) fine-tunes the same adapted checkpoint without pretraining; the conversion ran once for both.
    assert set(rows["d"]["seconds"]) == {"vocabulary", "fine-tuning"}
    assert rows["d"]["seconds"]["vocabulary"] == rows["c"]["seconds"]["vocabulary"]
    assert rows["d"]["pieces_per_review"] == rows["c"]["pieces_per_review"]
    assert rows["d"]["vocabulary"] == rows["c"]["vocabulary"]
    assert "| (c) MiniLM + vocabulary adaptation + MLM |" in out
    assert "| (d) MiniLM + vocabulary adaptation, no MLM |" in out
