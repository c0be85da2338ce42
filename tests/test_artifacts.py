"""Run artifacts: plots are real images, tables hold the right numbers, predictions sort errors first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from finetune.reports.artifacts import write_learning_curves, write_model_card
from finetune.tasks import Reference, TaskSettings, get_task

pytestmark = pytest.mark.figures  # the plots are what these tests look at

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRICKY = ['plain', 'a, comma', 'say "hi", then\nleave', "it's; fine", 'x', 'last, "one"']


def assert_png(path: Path, min_side: int = 100) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        width, height = img.size
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert min(width, height) >= min_side
    assert pixels.std() > 0  # not a blank canvas
    return width, height


def write_evaluation_artifacts(out_dir, *, task, label_names, texts, pairs, gold, logits, threshold=0.5):
    """The evaluation files a sentence task writes for a split with these texts, gold labels and logits."""
    import datasets

    columns = {"text": list(texts), "labels": [g.tolist() if hasattr(g, "tolist") else g for g in gold]}
    data = type("Data", (), {"text_column": "text", "text_pair_column": "pair" if pairs is not None else None})
    if pairs is not None:
        columns["pair"] = list(pairs)
    reference = Reference(None, datasets.Dataset.from_dict(columns), data)
    return task.write_artifacts(out_dir, reference, logits, {}, label_names, TaskSettings(threshold=threshold))


def one_hot_logits(pred: list[int], n: int, confidence: list[float] | None = None) -> np.ndarray:
    logits = np.zeros((len(pred), n))
    for row, label in enumerate(pred):
        logits[row, label] = confidence[row] if confidence else 3.0
    return logits


# --- classification ----------------------------------------------------------------------------

LABELS = ["neg", "neu", "pos"]
GOLD = np.array([0, 0, 1, 2, 2, 1])
PRED = [0, 1, 1, 2, 0, 1]


def test_classification_files_and_per_class_numbers(tmp_path):
    task = get_task("classification")
    paths = write_evaluation_artifacts(
        tmp_path, task=task, label_names=LABELS, texts=TRICKY, pairs=None, gold=GOLD, logits=one_hot_logits(PRED, 3)
    )
    names = {p.name for p in paths}
    assert names == {"confusion_matrix.png", "per_class_metrics.csv", "per_class_metrics.md", "predictions.csv"}
    assert all(p.exists() and p.parent == tmp_path for p in paths)
    assert_png(tmp_path / "confusion_matrix.png")

    table = pd.read_csv(tmp_path / "per_class_metrics.csv").set_index("label")
    # Hand-computed from the confusion matrix [[1,1,0],[0,2,0],[1,0,1]] (rows gold, columns predicted).
    expected = {"neg": (1 / 2, 1 / 2, 2), "neu": (2 / 3, 1.0, 2), "pos": (1.0, 1 / 2, 2)}
    for label, (precision, recall, support) in expected.items():
        assert table.loc[label, "precision"] == pytest.approx(precision, abs=1e-4)
        assert table.loc[label, "recall"] == pytest.approx(recall, abs=1e-4)
        f1 = 2 * precision * recall / (precision + recall)
        assert table.loc[label, "f1"] == pytest.approx(f1, abs=1e-4)
        assert table.loc[label, "support"] == support
    assert table.loc["macro avg", "precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3, abs=1e-4)
    assert table.loc["weighted avg", "support"] == 6

    markdown = (tmp_path / "per_class_metrics.md").read_text()
    assert markdown.startswith("| label | precision | recall | f1 | support |")
    assert "| neu | 0.6667 | 1.0000 |" in markdown and "macro avg" in markdown


def test_classification_predictions_csv(tmp_path):
    task = get_task("classification")
    # Confidences differ so the within-group order by score is checkable.
    logits = one_hot_logits(PRED, 3, confidence=[1.0, 2.0, 4.0, 3.0, 5.0, 0.5])
    write_evaluation_artifacts(
        tmp_path, task=task, label_names=LABELS, texts=TRICKY, pairs=None, gold=GOLD, logits=logits
    )
    frame = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert list(frame.columns) == ["text", "gold", "predicted", "score", "correct"]
    assert set(frame["gold"]) <= set(LABELS) and set(frame["predicted"]) <= set(LABELS)
    # Two errors (rows 1 and 4) come first, each group by descending score.
    assert list(frame["correct"]) == [False, False, True, True, True, True]
    assert list(frame["text"]) == [TRICKY[4], TRICKY[1], TRICKY[2], TRICKY[3], TRICKY[0], TRICKY[5]]
    assert list(frame["score"]) == sorted(frame["score"][:2], reverse=True) + sorted(frame["score"][2:], reverse=True)
    assert sorted(frame["text"]) == sorted(TRICKY)  # commas, quotes and newlines survive the round trip
    first = frame.iloc[0]
    assert (first["gold"], first["predicted"]) == ("pos", "neg")
    # score is the softmax probability of the predicted label, as the served model reports it.
    expected = task.postprocess(logits[4:5], LABELS)[0]["score"]
    assert first["score"] == pytest.approx(expected)


def test_pair_texts_get_their_own_column(tmp_path):
    task = get_task("classification")
    pairs = [f"second, {t}" for t in TRICKY]
    write_evaluation_artifacts(
        tmp_path, task=task, label_names=LABELS, texts=TRICKY, pairs=pairs, gold=GOLD, logits=one_hot_logits(PRED, 3)
    )
    frame = pd.read_csv(tmp_path / "predictions.csv")
    assert list(frame.columns) == ["text", "text_pair", "gold", "predicted", "score", "correct"]
    assert all(pair == f"second, {text}" for text, pair in zip(frame["text"], frame["text_pair"]))


def test_confusion_matrix_grows_for_many_labels(tmp_path):
    task = get_task("classification")
    labels = [f"emotion_{i}" for i in range(30)]
    gold = np.arange(60) % 30
    small_dir, big_dir = tmp_path / "small", tmp_path / "big"
    write_evaluation_artifacts(small_dir, task=task, label_names=LABELS, texts=TRICKY, pairs=None, gold=GOLD,
                               logits=one_hot_logits(PRED, 3))
    write_evaluation_artifacts(big_dir, task=task, label_names=labels, texts=[str(i) for i in range(60)], pairs=None,
                               gold=gold, logits=one_hot_logits(list((gold + 1) % 30), 30))
    small = assert_png(small_dir / "confusion_matrix.png")
    big = assert_png(big_dir / "confusion_matrix.png")
    assert big[0] > 1.5 * small[0]
    assert (pd.read_csv(big_dir / "per_class_metrics.csv").set_index("label").loc[labels, "recall"] == 0).all()


# --- multi-label --------------------------------------------------------------------------------

ML_LABELS = ["a", "b", "c"]
ML_GOLD = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
# Predicted at 0.5: [a], [b], [a, b], [c]; rows 1 and 3 are wrong.
ML_LOGITS = np.array([[2.0, -2, -2], [-2, 1.0, -1], [3.0, 0.5, -3], [-2, -2, 0.2]])


def test_multi_label_files_and_per_class_numbers(tmp_path):
    task = get_task("multi_label")
    paths = write_evaluation_artifacts(tmp_path, task=task, label_names=ML_LABELS, texts=TRICKY[:4], pairs=None,
                                       gold=ML_GOLD, logits=ML_LOGITS)
    assert {p.name for p in paths} == {"per_class_metrics.csv", "per_class_metrics.md", "predictions.csv"}
    table = pd.read_csv(tmp_path / "per_class_metrics.csv").set_index("label")
    assert list(table.loc[["a", "b", "c"], "precision"]) == [1.0, 1.0, 0.0]
    assert list(table.loc[["a", "b", "c"], "recall"]) == [1.0, 1.0, 0.0]
    assert list(table.loc[["a", "b", "c"], "support"]) == [2, 2, 1]
    # micro: TP 4, FP 1, FN 1
    assert table.loc["micro avg", "precision"] == pytest.approx(0.8)
    assert table.loc["micro avg", "recall"] == pytest.approx(0.8)


def test_multi_label_predictions_csv(tmp_path):
    task = get_task("multi_label")
    write_evaluation_artifacts(tmp_path, task=task, label_names=ML_LABELS, texts=TRICKY[:4], pairs=None,
                               gold=ML_GOLD, logits=ML_LOGITS)
    frame = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False).set_index("text")
    assert list(frame["correct"]) == [False, False, True, True]
    assert frame.loc[TRICKY[1], "gold"] == "b;c" and frame.loc[TRICKY[1], "predicted"] == "b"
    assert frame.loc[TRICKY[2], "gold"] == "a;b" and frame.loc[TRICKY[2], "predicted"] == "a;b"
    assert frame.loc[TRICKY[3], "gold"] == ""
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert frame.loc[TRICKY[2], "score"] == pytest.approx((sig(3.0) + sig(0.5)) / 2)


def test_multi_label_threshold_is_applied(tmp_path):
    task = get_task("multi_label")
    write_evaluation_artifacts(tmp_path, task=task, label_names=ML_LABELS, texts=TRICKY[:4], pairs=None,
                               gold=ML_GOLD, logits=ML_LOGITS, threshold=0.9)
    frame = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False).set_index("text")
    # Only sigmoid(3.0) = 0.95 clears 0.9; an empty prediction scores 0.
    assert frame.loc[TRICKY[2], "predicted"] == "a"
    assert frame.loc[TRICKY[1], "predicted"] == "" and frame.loc[TRICKY[1], "score"] == 0


# --- regression ---------------------------------------------------------------------------------


def test_regression_predictions_and_scatter(tmp_path):
    task = get_task("regression")
    gold = np.array([1.0, 2.0, 3.0, 4.0])
    logits = np.array([[1.1], [3.5], [2.0], [4.0]])
    paths = write_evaluation_artifacts(tmp_path, task=task, label_names=None, texts=TRICKY[:4], pairs=None,
                                       gold=gold, logits=logits)
    assert {p.name for p in paths} == {"predictions.csv", "scatter.png"}
    assert_png(tmp_path / "scatter.png")
    frame = pd.read_csv(tmp_path / "predictions.csv")
    assert list(frame.columns) == ["text", "gold", "predicted", "score", "correct"]
    # Largest absolute error first: 1.5, 1.0, 0.1, 0.0.
    assert list(frame["text"]) == [TRICKY[1], TRICKY[2], TRICKY[0], TRICKY[3]]
    assert list(frame["predicted"]) == pytest.approx([3.5, 2.0, 1.1, 4.0])
    assert frame["score"].isna().all()


# --- learning curves ----------------------------------------------------------------------------


def test_learning_curves(tmp_path):
    history = {"train/loss": [(2, 0.9), (4, 0.7), (6, 0.5)], "eval/loss": [(6, 0.6)], "eval/accuracy": [(6, 0.8)]}
    path = write_learning_curves(tmp_path, history, "accuracy")
    assert path == tmp_path / "learning_curves.png"
    assert_png(path)


@pytest.mark.parametrize("history", [{"train/loss": [(1, 1.0), (2, 0.8)], "eval/accuracy": []}, {}])
def test_learning_curves_with_empty_series(tmp_path, history):
    assert_png(write_learning_curves(tmp_path / "curves", history, "eval/accuracy"))


# --- model card ---------------------------------------------------------------------------------


def test_model_card(tmp_path):
    recipe = {"name": "sst2-tiny", "model": {"checkpoint": "bert-base-uncased", "max_length": 96},
              "task": {"type": "classification"}}
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False)
    path = write_model_card(
        tmp_path, recipe_yaml=recipe_yaml, recipe_name="sst2-tiny", checkpoint="bert-base-uncased",
        task=get_task("classification"), label_names=["negative", "positive"],
        label_counts={"train": {"negative": 120, "positive": 136}, "validation": {"negative": 30, "positive": 34}},
        metrics={"accuracy": 0.8125, "f1_macro": 0.8}, test_metrics={"accuracy": 0.7031},
        data_description="SST-2 movie review sentences.", train_examples=256,
    )
    assert path == tmp_path / "MODEL_CARD.md"
    card = path.read_text()
    assert f"```yaml\n{recipe_yaml.rstrip()}\n```" in card
    assert "`negative`" in card and "`positive`" in card
    assert "| accuracy | 0.8125 |" in card and "| accuracy | 0.7031 |" in card
    assert "| negative | 120 | 30 |" in card
    assert "SST-2 movie review sentences." in card and "bert-base-uncased" in card
    assert "256 examples" in card and "96 tokens" in card
    for section in ("## Data", "## Labels", "## Metrics", "## Recipe", "## Intended use", "## Limitations"):
        assert section in card


def test_model_card_regression_without_test_metrics(tmp_path):
    card = write_model_card(
        tmp_path, recipe_yaml="name: stsb\n", recipe_name="stsb", checkpoint="distilbert-base-uncased",
        task=get_task("regression"), label_names=None,
        label_counts={"train": {"min": 0.0, "mean": 2.5, "max": 5.0}}, metrics={"pearson": 0.5},
        test_metrics={}, data_description="",
    ).read_text()
    assert "## Labels" not in card and "| mean | 2.5000 |" in card
    assert "| pearson | 0.5000 |" in card and "_not computed_" in card
    assert "128 tokens" in card  # the schema default when the recipe does not say
