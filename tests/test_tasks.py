"""Task definitions and metrics, with hand-checked expectations."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.tasks.metrics import is_improvement
from finetune.tasks import PostprocessOptions, get_task


def test_classification_postprocess_is_softmax_argmax():
    logits = np.array([[0.0, np.log(3.0)], [2.0, 0.0]])
    answers = get_task("classification").postprocess(logits, ["neg", "pos"], PostprocessOptions(top_k=2))
    assert answers[0]["label"] == "pos" and answers[0]["score"] == pytest.approx(0.75)
    assert answers[0]["scores"] == pytest.approx({"neg": 0.25, "pos": 0.75})
    assert [t["label"] for t in answers[0]["top_k"]] == ["pos", "neg"]
    assert answers[1]["label"] == "neg"


def test_multi_label_postprocess_applies_the_threshold():
    logits = np.array([[2.0, -2.0, 0.1]])  # sigmoid: 0.881, 0.119, 0.525
    task = get_task("multi_label")
    (answer,) = task.postprocess(logits, ["a", "b", "c"], PostprocessOptions(threshold=0.5))
    assert answer["labels"] == ["a", "c"]
    assert answer["label_scores"] == pytest.approx([0.8808, 0.5250], abs=1e-4)
    (strict,) = task.postprocess(logits, ["a", "b", "c"], PostprocessOptions(threshold=0.9))
    assert strict["labels"] == []


def test_regression_postprocess_returns_the_value():
    assert get_task("regression").postprocess(np.array([[1.5], [-0.25]]), None) == [{"value": 1.5}, {"value": -0.25}]


def test_metrics_by_hand():
    cls = get_task("classification").compute_metrics(np.array([[1, 0], [0, 1], [0, 1], [1, 0]]), np.array([0, 1, 0, 0]))
    assert cls["accuracy"] == 0.75
    assert cls["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    ml = get_task("multi_label").compute_metrics(np.array([[5.0, -5.0], [5.0, 5.0]]), np.array([[1, 0], [0, 1]]))
    # predicted {a}, {a, b}; gold {a}, {b}: tp 2, fp 1, fn 0 -> micro F1 = 4 / 5
    assert ml["f1_micro"] == pytest.approx(0.8)
    assert ml["subset_accuracy"] == 0.5
    reg = get_task("regression").compute_metrics(np.array([[1.0], [2.0], [3.0]]), np.array([2.0, 4.0, 6.0]))
    assert reg["pearson"] == pytest.approx(1.0) and reg["mse"] == pytest.approx((1 + 4 + 9) / 3)


def test_improvement_respects_direction():
    assert is_improvement(0.9, None, True)
    assert is_improvement(0.9, 0.8, True) and not is_improvement(0.8, 0.8, True)
    assert is_improvement(0.1, 0.2, False) and not is_improvement(0.3, 0.2, False)


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="known tasks: classification, regression, multi_label"):
        get_task("ner")
