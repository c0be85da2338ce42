"""Label errors: cleanlab's ranking from held-out probabilities, and `finetune label-issues` finding flipped labels."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

from finetune.cli import main
from finetune.errors import EvaluationError
from finetune.evaluation.label_issues import rank_label_issues, require_class_probabilities
from finetune.tasks import get_task
from tests.conftest import run_bench, write_recipe

POSITIVE = "great good wonderful beautiful best fun funny brilliant".split()
NEGATIVE = "bad worst boring dull awful mess stupid poor".split()
FILLER = "the film is a movie and it was".split()


def test_ranking_finds_the_flipped_labels_from_held_out_probabilities():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    probs = np.full((300, 3), 0.05) + rng.uniform(0, 0.05, (300, 3))
    probs[np.arange(300), truth] = 0.9
    probs /= probs.sum(axis=1, keepdims=True)
    given = truth.copy()
    flipped = rng.choice(300, 15, replace=False)
    given[flipped] = (given[flipped] + 1) % 3
    frame = rank_label_issues(given, probs, ["a", "b", "c"])
    # Confident learning flags as many as it estimates are wrong per class pair: all but one at most here, and
    # nothing that was not flipped.
    assert set(frame["position"]) <= set(flipped) and len(frame) >= len(flipped) - 1
    assert frame["given_probability"].is_monotonic_increasing  # the most disputed first
    first = frame.iloc[0]
    assert first["suggested_label"] == "abc"[truth[first["position"]]]
    assert first["given_label"] == "abc"[given[first["position"]]]
    # Multi-label: one label of a row flipped (added where the model is sure it is absent, or removed).
    truth = (rng.uniform(size=(300, 4)) < 0.3).astype(int)
    sure = np.where(truth == 1, 0.9, 0.05) + rng.uniform(0, 0.05, (300, 4))
    given = truth.copy()
    flipped = rng.choice(300, 15, replace=False)
    given[flipped, rng.integers(0, 4, 15)] ^= 1
    found = set(rank_label_issues(given, sure, list("abcd"))["position"])
    assert found <= set(flipped) and len(found) >= 5, (sorted(found), sorted(flipped))


def test_tasks_without_class_probabilities_are_refused_by_name():
    with pytest.raises(EvaluationError, match="regression models do not give; tasks that do: classification, multi_label"):
        require_class_probabilities(get_task("regression"))


def test_label_issues_finds_flipped_labels_in_a_constructed_data_set(tiny_checkpoints, tmp_path, capsys):
    """Sentiment from keywords a tiny model learns in a few dozen steps, 5% of the labels flipped: the out-of-fold
    models disagree with exactly those, and cleanlab flags them."""
    rng = random.Random(0)
    flipped = set(rng.sample(range(160), 8))
    lines = ["text,label"]
    for i in range(160):
        positive = i % 2 == 1
        words = rng.sample(POSITIVE if positive else NEGATIVE, 3) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        label = "positive" if positive != (i in flipped) else "negative"
        lines.append(f"{' '.join(words)},{label}")
    (tmp_path / "reviews.csv").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "reviews.yaml", {
        "name": "reviews", "model": {"checkpoint": str(tiny_checkpoints["bert"]), "max_length": 32},
        "data": {"files": {"train": "reviews.csv"}, "text_column": "text", "label_column": "label"},
        "task": {"type": "classification"},
        "training": {"max_steps": 40, "batch_size": 16, "learning_rate": 3e-3, "warmup_ratio": 0.0, "logging_steps": 10},
        "tracking": {"log_model": False, "system_metrics": False}})
    # The default output folder (OUTPUT_DIR-label-issues): the folds' models train elsewhere, so it holds only
    # the issues and finetune writes them there.
    assert main(["label-issues", str(recipe), "--folds", "2"]) == 0
    out = capsys.readouterr().out
    assert "label issues:" in out and "out-of-fold (2 folds, 160 examples" in out
    issues = pd.read_csv(tmp_path / "runs" / "reviews-label-issues" / "label_issues.csv")
    assert list(issues.columns) == ["row", "text", "given_label", "suggested_label", "label_quality",
                                    "given_probability", "suggested_probability"]
    flagged = set(issues["row"])
    # 5% of the labels are flipped, so flagging at random would be 5% precise; how close to all eight a model of a
    # few dozen steps gets depends on its float rounding (fp32 or bf16, this CPU's kernels): a margin, not a tuned edge.
    assert len(flagged & flipped) >= 6 and len(flagged & flipped) / len(flagged) >= 0.6, (sorted(flagged), sorted(flipped))
    row = issues.iloc[0]
    assert row["given_label"] != row["suggested_label"]
    assert lines[row["row"] + 1].startswith(row["text"])  # `row` is the row in the file

    import mlflow

    (parent,) = mlflow.search_runs(experiment_names=["reviews"], filter_string="tags.`finetune.label_issues` = 'true'",
                                   output_format="list")
    assert parent.data.metrics["label_issues"] == len(issues)
    assert len(mlflow.search_runs(experiment_names=["reviews"], output_format="list")) == 3  # the parent, 2 folds


def test_quick_label_issue_benchmark_runs(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    report = tmp_path / "bench.json"
    code, out, err = run_bench("label_issues", ["--quick", "--checkpoint", str(tiny_checkpoints["bert"]),
                                                "--json", str(report)], monkeypatch, capsys)
    assert code == 0, out[-2000:] + err[-3000:]
    assert "200 SST-2 sentences, 10 labels flipped (seed 0), 2 folds" in out
    saved = json.loads(report.read_text())
    assert saved["flipped"] == 10 and 0 <= saved["precision"] <= 1 and 0 <= saved["recall"] <= 1
