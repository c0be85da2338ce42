"""bench/pair_phase.py's smoke run: fp32 and bf16 pair phases on the same drawn pairs, side by side, and the table."""

from __future__ import annotations

import pytest

from tests.conftest import DATA, load_bench

pytestmark = pytest.mark.e2e


def test_both_precisions_train_the_same_pairs_and_the_table_compares_them(tiny_checkpoints, monkeypatch, capsys):
    module = load_bench("pair_phase", monkeypatch)
    monkeypatch.setattr(module.fewshot, "SHARED", DATA)  # the shipped SST-2 sample stands in for ../shared/data
    monkeypatch.setattr(module.fewshot, "MODEL", str(tiny_checkpoints["bert"]))
    assert module.main(["--sets", "sst2", "--n", "4", "--steps", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "SST-2 fp32: " in out and "s a step (fp32)" in out and "s a step (bf16 autocast)" in out
    row = next(line for line in out.splitlines() if line.startswith("| SST-2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["64", str(2 * 4 + 2 * 8)]  # 4 drawn per class and 8 label sentences per class
    assert float(cells[5].rstrip("x")) > 0
    assert float(cells[6]) > 0  # bf16 really computed otherwise: the weights it trained differ from fp32's
    assert "command: python bench/pair_phase.py --sets sst2" in out
