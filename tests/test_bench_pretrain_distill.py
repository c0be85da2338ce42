"""`bench/pretrain.py --quick` and `bench/distill.py --quick` run every comparison end to end on a tiny checkpoint
and print their tables (no figure is asserted: benchmarks are not tests). Each main() runs in the test's process;
bench/distill.py's serving runs are processes of their own."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_bench, run_bench

pytestmark = pytest.mark.e2e


def test_quick_pretraining_benchmark_runs_both_comparisons(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    report = tmp_path / "bench.json"
    code, out, err = run_bench("pretrain", ["--quick", "--checkpoint", str(tiny_checkpoints["bert"]), "--json", str(report)],
                               monkeypatch, capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    for line in ("| MiniLM + chunks | 1 |", "| MiniLM as BigBird 1536, MLM-pretrained | 1 |",
                 "| MiniLM + chunks (BENCHMARKS.md, 1 seed) | 1 | 0.8232 |", "| quickstart after task-adaptive MLM | 1 |",
                 "Pretraining (hyperpartisan-bigbird-mlm.yaml):", "command: python bench/pretrain.py --quick"):
        assert line in out, out
    saved = json.loads(report.read_text())
    assert [s for s, _ in saved["long"]["pretraining"]["perplexity_curve"]] == [2, 4]
    assert set(saved["long"]["pretraining"]["by_position"]) == {"positions 0-511"}  # 256 tokens: all below 512
    for way in saved["long"]["ways"].values():
        assert all(0 <= a <= 1 for a in way["test_accuracy"])
    assert all(0 <= a <= 1 for r in saved["short"]["ways"].values() for a in r["dev_accuracy"])


def test_quick_distillation_benchmark_trains_teacher_students_and_serves_both(tiny_checkpoints, tmp_path, monkeypatch,
                                                                              capsys):
    report = tmp_path / "bench.json"
    code, out, err = run_bench("distill", ["--quick", "--checkpoint", str(tiny_checkpoints["bert"]), "--json", str(report)],
                               monkeypatch, capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "| teacher | 2 |" in out and "| student distilled (layers 0) | 1 |" in out, out
    assert "student without teacher (layers 0)" in out and "throughput vs teacher" in out
    assert out.count("- met: ") + out.count("- MISSED: ") == 3
    saved = json.loads(report.read_text())
    assert saved["layers"] == "0" and saved["serving"]["teacher"]["rps"] > 0 and saved["serving"]["distilled"]["rps"] > 0
    forward = saved["forward"]
    assert forward["teacher"]["sentences_per_s"] > 0 and len(forward["distilled"]["ratio_by_round"]) == 2
    assert "forward passes alone, batches of 16 dev sentences" in out, out[-2000:]


def test_a_stopped_benchmark_resumes_without_running_finished_runs_again(tiny_checkpoints, tmp_path, monkeypatch,
                                                                         capsys):
    """The full benchmarks outlast a working session: `--resume` in the same work folder reads the finished runs
    back from MLflow and runs again only the one that was stopped (its journal has no `finished` line)."""
    work, first, second = tmp_path / "work", tmp_path / "first.json", tmp_path / "second.json"
    common = ["short", "--quick", "--checkpoint", str(tiny_checkpoints["bert"]), "--workdir", str(work)]
    code, out, err = run_bench("pretrain", [*common, "--json", str(first)], monkeypatch, capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "not run again" not in out
    journal = work / "bench-journal.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["started", "finished"] * 3  # the pretraining and one seed of each way
    stopped = entries[-1]["args"]  # pretend the last fine-tuning was killed: started, never finished
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries[:-1]))

    code, out, err = run_bench("pretrain", [*common, "--resume", "--json", str(second)], monkeypatch, capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    assert out.count("not run again") == 2, out
    ran = [line for line in out.splitlines() if line.startswith("$ finetune ") and "not run again" not in line]
    assert len(ran) == 1 and all(arg in ran[0] for arg in stopped[-2:]), out
    before, after = json.loads(first.read_text())["short"], json.loads(second.read_text())["short"]
    assert after["pretraining"] == before["pretraining"]  # read back from the MLflow store, not trained again
    assert after["ways"]["quickstart"]["dev_accuracy"] == before["ways"]["quickstart"]["dev_accuracy"]
    assert after["ways"]["quickstart"]["seconds"] == before["ways"]["quickstart"]["seconds"]


def test_serving_rounds_take_turns_and_pair_each_round(tmp_path, monkeypatch):
    """Teacher and student are served in turns, and the speed-up is the median of each round's own ratio: a slow
    spell of the machine during one round (here round 2, both 2x slower) does not move it."""
    module = load_bench("distill", monkeypatch)
    order, rps = [], {("t", 0): 100.0, ("s", 0): 190.0, ("t", 1): 50.0, ("s", 1): 95.0, ("t", 2): 110.0, ("s", 2): 176.0}

    def fake_serve(model, clients, quick, workdir):
        n = sum(1 for m in order if m == model.name)
        order.append(model.name)
        return {"clients": clients, "rps": rps[(model.name, n)], "p99_ms": 1000 / rps[(model.name, n)]}

    monkeypatch.setattr(module, "serve_throughput", fake_serve)
    out = module.serve_rounds({"teacher": tmp_path / "t", "distilled": tmp_path / "s"}, 3, 16, False, tmp_path)
    assert order == ["t", "s", "t", "s", "t", "s"]
    assert out["teacher"]["rps"] == 100.0 and out["distilled"]["rps"] == 176.0
    assert out["distilled"]["ratio_by_round"] == pytest.approx([1.9, 1.9, 1.6])
    assert len(out["teacher"]["rounds"]) == 3
