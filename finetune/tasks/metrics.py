"""Evaluation metrics that work offline.

`evaluate.load` with a metric's name downloads a metric script from the Hugging Face hub at run time,
which fails on machines without internet (and makes results depend on a remote script), so
the metrics this project relies on are thin wrappers over scikit-learn and SciPy, with the
same names and definitions as the `evaluate` ones. They are defined here once; the `evaluate` modules
finetune ships (finetune/evaluation/metric_modules, loaded by path) call these same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


class _Lazy:
    """A module imported on first use. scikit-learn and SciPy's statistics take over a second to import, and
    every command and server start would pay it though only evaluation computes metrics."""

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attr: str):
        if self._module is None:
            import importlib

            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


skm = _Lazy("sklearn.metrics")
stats = _Lazy("scipy.stats")


@dataclass(frozen=True)
class Metric:
    """A named metric: how to compute it and which direction is better."""

    name: str
    compute: Callable[[np.ndarray, np.ndarray], float]
    greater_is_better: bool = True


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The share of predictions equal to the gold value (classification, multiple choice)."""
    return float(skm.accuracy_score(y_true, y_pred))


def _f1_macro(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))


def _pearson(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    if np.std(y_true) == 0 or np.std(y_pred) == 0:
        return 0.0  # undefined correlation: report "no signal" rather than NaN
    return float(stats.pearsonr(y_true, y_pred).statistic)


def _spearman(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    if np.std(y_true) == 0 or np.std(y_pred) == 0:
        return 0.0
    return float(stats.spearmanr(y_true, y_pred).statistic)


# Classification metrics take integer class ids; multi-label ones take 0/1 indicator matrices;
# regression ones take floats.
CLASSIFICATION = {
    m.name: m
    for m in [
        Metric("accuracy", accuracy),
        Metric("f1_macro", _f1_macro),
        Metric("f1_weighted", lambda t, p: float(skm.f1_score(t, p, average="weighted", zero_division=0))),
        Metric("precision_macro", lambda t, p: float(skm.precision_score(t, p, average="macro", zero_division=0))),
        Metric("recall_macro", lambda t, p: float(skm.recall_score(t, p, average="macro", zero_division=0))),
        Metric("matthews_correlation", lambda t, p: float(skm.matthews_corrcoef(t, p))),
    ]
}

MULTI_LABEL = {
    m.name: m
    for m in [
        Metric("f1_micro", lambda t, p: float(skm.f1_score(t, p, average="micro", zero_division=0))),
        Metric("f1_macro", _f1_macro),
        Metric("precision_micro", lambda t, p: float(skm.precision_score(t, p, average="micro", zero_division=0))),
        Metric("recall_micro", lambda t, p: float(skm.recall_score(t, p, average="micro", zero_division=0))),
        Metric("subset_accuracy", lambda t, p: float(skm.accuracy_score(t, p))),
        Metric("hamming_loss", lambda t, p: float(skm.hamming_loss(t, p)), greater_is_better=False),
    ]
}

REGRESSION = {
    m.name: m
    for m in [
        Metric("pearson", _pearson),
        Metric("spearman", _spearman),
        Metric("mse", lambda t, p: float(skm.mean_squared_error(t, p)), greater_is_better=False),
        Metric("mae", lambda t, p: float(skm.mean_absolute_error(t, p)), greater_is_better=False),
        Metric("r2", lambda t, p: float(skm.r2_score(t, p))),
    ]
}


def compute_all(metrics: dict[str, Metric], y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Compute every metric of a family; returns plain floats keyed by metric name."""
    return {name: m.compute(y_true, y_pred) for name, m in metrics.items()}


def is_improvement(new: float, best: float | None, greater_is_better: bool) -> bool:
    """Whether `new` beats `best` (None means there is nothing to beat yet)."""
    if best is None:
        return True
    return new > best if greater_is_better else new < best


def named(*names: str, greater_is_better: bool = True) -> dict[str, Metric]:
    """Metrics a task computes itself (over spans or entities, not aligned arrays): only names and direction."""

    def not_array_metric(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        raise TypeError("this metric is computed by its task definition, not from aligned arrays")

    return {name: Metric(name, not_array_metric, greater_is_better) for name in names}


# --- entities (NER) --------------------------------------------------------------------------


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval, strict IOB2), overall and per entity type, plus token accuracy.

    Strict mode counts an entity only when its type and both boundaries match, and ignores predicted
    entities that break IOB2 (an I- tag with no B- before it), as the CoNLL evaluation does.
    """
    from seqeval.metrics import accuracy_score, classification_report
    from seqeval.scheme import IOB2

    report = classification_report(gold, predicted, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    scores = {
        "precision": float(report["micro avg"]["precision"]),
        "recall": float(report["micro avg"]["recall"]),
        "f1": float(report["micro avg"]["f1-score"]),
        "accuracy": float(accuracy_score(gold, predicted)),
    }
    for kind, row in report.items():
        if kind.endswith(" avg"):
            continue
        scores[f"f1_{kind}"] = float(row["f1-score"])
        scores[f"precision_{kind}"] = float(row["precision"])
        scores[f"recall_{kind}"] = float(row["recall"])
    return scores


# --- extractive QA (SQuAD v1.1) ----------------------------------------------------------------
# The official SQuAD v1.1 definitions, written out: `evaluate.load("squad")` fetches its script from the hub.


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, the articles a/an/the, and extra white space (SQuAD's normalisation)."""
    import re
    import string

    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 between a predicted and a gold answer, after normalisation."""
    import collections

    pred_tokens = normalize_answer(prediction).split()
    true_tokens = normalize_answer(truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(true_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Exact match and F1 (0-100), each the best over an example's gold answers, averaged over examples."""
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for prediction, answers in zip(predictions, golds):
        answers = answers or [""]
        em += max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)
        f1 += max(squad_f1(prediction, a) for a in answers)
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1 / len(predictions)}
