"""bench/fewshot_heads.py: the heads learn a separable toy; a smoke run on a body bench/fewshot.py trained."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import DATA, load_bench


def test_every_head_learns_two_separated_clusters(monkeypatch):
    module = load_bench("fewshot_heads", monkeypatch)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16)).astype(np.float32) * 3
    x = np.concatenate([centres[i] + rng.normal(size=(40, 16)).astype(np.float32) for i in range(2)])
    test = np.concatenate([centres[i] + rng.normal(size=(50, 16)).astype(np.float32) for i in range(2)])
    y, gold = np.repeat([0, 1], 40), np.repeat([0, 1], 50)
    got = module.heads(x, y, test, gold, 2, None, seeds=2)
    assert set(got) == set(module.HEADS)
    assert all(value >= 0.95 for value in got.values()), got
    flipped = module.heads(x, 1 - y, test, gold, 2, None, seeds=1)  # wrong labels: the heads really read them
    assert all(value <= 0.05 for value in flipped.values()), flipped


@pytest.mark.e2e
def test_a_smoke_run_reads_the_body_a_fewshot_cell_saved_with_its_label_sentences(tiny_checkpoints, tmp_path,
                                                                                 monkeypatch, capsys):
    module = load_bench("fewshot_heads", monkeypatch)
    fewshot = module.fewshot
    monkeypatch.setattr(fewshot, "SHARED", DATA)  # the shipped SST-2 sample stands in for ../shared/data
    monkeypatch.setattr(fewshot, "MODEL", str(tiny_checkpoints["bert"]))
    real = fewshot.Runner
    monkeypatch.setattr(fewshot, "Runner", lambda workdir: real(workdir, in_process=True))
    assert fewshot.main(["--sets", "sst2", "--ns", "4", "--draws", "1", "--methods", "contrastive", "--max-test", "30",
                         "--workdir", str(tmp_path)]) == 0
    embedded = []
    real_embed = module.embed
    monkeypatch.setattr(module, "embed",
                        lambda folder, splits, n: embedded.append(splits) or real_embed(folder, splits, n))
    capsys.readouterr()
    assert module.main(["--workdir", str(tmp_path), "--sets", "sst2", "--ns", "4", "--draws", "0", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    [(train, test)] = embedded  # one load of the body for both
    assert len(train) == 2 * 4 + 2 * 8 and "This sentence is positive." in train  # the draw and the run's sentences
    assert len(test) == 30
    row = next(line for line in out.splitlines() if line.startswith("| SST-2 | 4 | 0 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(0.0 <= float(c) <= 1.0 for c in cells[3:7]) and float(cells[7]) > 0
    assert "command: python bench/fewshot_heads.py --workdir" in out
    embedded.clear()
    assert module.main(["--workdir", str(tmp_path), "--sets", "sst2", "--ns", "4", "--draws", "0", "--seeds", "1",
                        "--head-texts", "drawn"]) == 0
    [(train, _)] = embedded
    assert len(train) == 2 * 4 and "This sentence is positive." not in train  # the drawn examples alone
    capsys.readouterr()
    assert module.main(["--workdir", str(tmp_path), "--sets", "sst2", "--ns", "8"]) == 1  # no body there
    assert "no contrastive bodies in" in capsys.readouterr().err
