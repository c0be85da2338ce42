"""bench/fewshot.py's smoke run: the draws, both of our methods on a tiny model, the table; SetFit's venv missing."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DATA, load_bench

pytestmark = pytest.mark.e2e


def _tiny(monkeypatch, tiny_checkpoints):
    module = load_bench("fewshot", monkeypatch)
    monkeypatch.setattr(module, "SHARED", DATA)  # the shipped SST-2 sample stands in for ../shared/data
    monkeypatch.setattr(module, "MODEL", str(tiny_checkpoints["bert"]))
    real = module.Runner
    monkeypatch.setattr(module, "Runner", lambda workdir: real(workdir, in_process=True))
    return module


def test_a_smoke_slice_draws_the_same_examples_for_every_method_and_writes_the_table(tiny_checkpoints, tmp_path,
                                                                                      monkeypatch, capsys):
    module = _tiny(monkeypatch, tiny_checkpoints)
    assert module.main(["--sets", "sst2", "--ns", "4", "--draws", "1", "--methods", "contrastive", "standard",
                        "--max-test", "40", "--workdir", str(tmp_path), "--markdown", str(tmp_path / "table.md")]) == 0
    out = capsys.readouterr().out
    drawn = [json.loads(line) for line in (tmp_path / "sst2-n4-d0.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in drawn) == ["negative"] * 4 + ["positive"] * 4
    for method in ("contrastive", "standard"):  # both trained on that file
        assert str(tmp_path / "sst2-n4-d0.jsonl") in (tmp_path / f"sst2-n4-d0-{method}.yaml").read_text()
    table = (tmp_path / "table.md").read_text()
    assert "| set | N per class | contrastive accuracy | standard accuracy | contrastive s | standard s |" in table
    assert "| SST-2 | 4 | " in table and "SST-2 N=4 draw 0 contrastive: accuracy" in out
    journal = (tmp_path / "bench-journal.jsonl").read_text()
    assert "training.contrastive.label_template=This sentence is {}." in journal  # ours with its label sentences
    assert "label sentences: 'This sentence is {}.' x 8 per class" in table


def test_setfit_names_needs_a_template(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    module = _tiny(monkeypatch, tiny_checkpoints)
    with pytest.raises(SystemExit):
        module.main(["--sets", "sst2", "--methods", "setfit-names", "--label-template", "none",
                     "--workdir", str(tmp_path)])
    assert "setfit-names needs a --label-template" in capsys.readouterr().err


def test_setfit_without_its_venv_says_how_to_make_it(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    module = _tiny(monkeypatch, tiny_checkpoints)
    monkeypatch.setattr(module, "SETFIT_VENV", tmp_path / "no-venv")
    with pytest.raises(SystemExit, match="run bench/peers/setup_setfit.sh first"):
        module.main(["--sets", "sst2", "--ns", "2", "--draws", "1", "--methods", "setfit", "--workdir", str(tmp_path)])


def test_resume_reuses_the_cells_measured_with_the_same_settings_and_only_those(tiny_checkpoints, tmp_path,
                                                                                 monkeypatch, capsys):
    module = _tiny(monkeypatch, tiny_checkpoints)
    slice_ = ["--sets", "sst2", "--ns", "2", "--draws", "1", "--methods", "standard", "--max-test", "20",
              "--workdir", str(tmp_path), "--resume"]
    assert module.main(slice_) == 0
    first = capsys.readouterr().out
    journal = (tmp_path / "bench-journal.jsonl").read_text().splitlines()
    with open(tmp_path / "fewshot-cells.jsonl", "a") as f:
        f.write('{"set": "sst2", "n": 2, "dr')  # an attempt killed while writing its next cell
    assert module.main(slice_) == 0  # the same cell again: read back, not trained
    again = capsys.readouterr().out
    assert "SST-2 N=2 draw 0 standard: accuracy" in again and "(measured earlier)" in again
    assert (tmp_path / "bench-journal.jsonl").read_text().splitlines() == journal
    accuracy = first.split("standard: accuracy ")[1].split(",")[0]
    assert f"standard: accuracy {accuracy}" in again
    assert module.main([*slice_[:-3], "--max-test", "10", "--workdir", str(tmp_path), "--resume"]) == 0
    assert "(measured earlier)" not in capsys.readouterr().out  # other test rows: measured anew
    assert len((tmp_path / "bench-journal.jsonl").read_text().splitlines()) == len(journal) + 2
    assert module.main([*slice_[:-3], "--max-test", "10", "--workdir", str(tmp_path), "--resume"]) == 0
    assert "(measured earlier)" in capsys.readouterr().out  # kept on a line of its own after the torn one


def test_a_contrastive_cell_measured_before_the_pair_phase_followed_the_runs_precision_is_measured_again(
        tmp_path, monkeypatch, tiny_checkpoints):
    module = _tiny(monkeypatch, tiny_checkpoints)
    shared = {"label_template": None, "label_examples": 0, "loss": "cosine", "max_test": None, "iterations": 20,
              "pair_batch": 16}
    old = [{"set": "bbc", "n": 8, "draw": 0, "method": method, "settings": shared,
            "result": {"accuracy": 0.9, "seconds": 1.0}} for method in ("contrastive", "setfit", "standard")]
    (tmp_path / "fewshot-cells.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old))
    cells = module.Cells(tmp_path, shared, reuse=True)
    assert cells.get(("bbc", 8, 0, "contrastive")) is None  # its pair phase was fp32 whatever the run's precision
    assert cells.get(("bbc", 8, 0, "setfit")) == cells.get(("bbc", 8, 0, "standard")) == old[0]["result"]
    cells.add(("bbc", 8, 0, "contrastive"), {"accuracy": 0.95, "seconds": 2.0})
    assert module.Cells(tmp_path, shared, reuse=True).get(("bbc", 8, 0, "contrastive")) == {"accuracy": 0.95,
                                                                                           "seconds": 2.0}


def test_our_sampling_and_long_inputs_choices_keep_their_cells_apart(tmp_path, monkeypatch, tiny_checkpoints):
    module = _tiny(monkeypatch, tiny_checkpoints)
    shared = {"label_template": None, "label_examples": 0, "loss": "cosine", "max_test": None, "iterations": 20,
              "pair_batch": 16}
    plain = module.Cells(tmp_path, shared, reuse=True)
    plain.add(("bbc", 8, 0, "contrastive"), {"accuracy": 0.93, "seconds": 1.0})
    plain.add(("bbc", 8, 0, "setfit"), {"accuracy": 0.94, "seconds": 1.0})
    chunked = module.Cells(tmp_path, shared, reuse=True, own={"contrastive": {"long_inputs": "chunk"}})
    assert chunked.get(("bbc", 8, 0, "contrastive")) is None  # ours read the articles otherwise: measured anew
    assert chunked.get(("bbc", 8, 0, "setfit")) == {"accuracy": 0.94, "seconds": 1.0}  # SetFit's cell still counts
    chunked.add(("bbc", 8, 0, "contrastive"), {"accuracy": 0.95, "seconds": 2.0})
    assert module.Cells(tmp_path, shared, reuse=True).get(("bbc", 8, 0, "contrastive"))["accuracy"] == 0.93
    again = module.Cells(tmp_path, shared, reuse=True, own={"contrastive": {"long_inputs": "chunk"}})
    assert again.get(("bbc", 8, 0, "contrastive"))["accuracy"] == 0.95


def test_the_choices_reach_our_runs(tiny_checkpoints, tmp_path, monkeypatch):
    module = _tiny(monkeypatch, tiny_checkpoints)
    assert module.main(["--sets", "sst2", "--ns", "2", "--draws", "1", "--methods", "contrastive", "--max-test", "10",
                        "--sampling", "unique", "--long-inputs", "chunk", "--workdir", str(tmp_path)]) == 0
    journal = (tmp_path / "bench-journal.jsonl").read_text()
    assert "training.contrastive.sampling=unique" in journal and "task.long_inputs=chunk" in journal
    (cell,) = [json.loads(line) for line in (tmp_path / "fewshot-cells.jsonl").read_text().splitlines()]
    assert cell["settings"]["sampling"] == "unique" and cell["settings"]["long_inputs"] == "chunk"
