"""Multi-label classification: a sigmoid per label, the labels at or over a threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import finetune.tasks.labels as L
import finetune.tasks.metrics as M
import finetune.tasks.imbalance as imbalance
from finetune.tasks.base import LabelEncoding, PostprocessOptions, TaskSettings, sigmoid
from finetune.tasks.sequence import SequenceTask


def label_tokens(value: Any, separator: str) -> list[Any]:
    """The labels of one row: a list, a separated string such as '4,27', a single value, or none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(separator) if t.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class MultiLabelTask(imbalance.WeightedLosses, SequenceTask):
    name = "multi_label"
    description = "multi-label classification (a sigmoid per label, labels over a threshold)"
    metrics = M.MULTI_LABEL
    default_metric = "f1_micro"
    sigmoid_scores = True
    hf_problem_type = "multi_label_classification"
    pipeline_task = "text-classification"
    onnx_export = True
    calibrates = True
    ranks_label_issues = True

    def label_names_from(self, values: Sequence[Any], data: Any) -> list[str]:
        found = {t for v in values for t in label_tokens(v, data.label_separator)}
        L.at_least_two(found, data)
        return L.sorted_values(found)

    def encode_labels(self, values: Sequence[Any], label_names: Sequence[str] | None, by_position: bool,
                      data: Any) -> LabelEncoding:
        import datasets

        index = {name: i for i, name in enumerate(label_names)}
        rows, bad = [], []
        for v in values:
            row = [0.0] * len(label_names)
            for token in label_tokens(v, data.label_separator):
                i = L.class_id(token, label_names, index, by_position)
                if i is None:
                    bad.append(token)
                else:
                    row[i] = 1.0
            rows.append(row)
        return LabelEncoding(rows, bad, datasets.Sequence(datasets.Value("float32")),
                             L.allowed_classes(label_names, by_position))

    def label_counts(self, split: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
        counts = np.asarray(split["labels"]).sum(axis=0).astype(int)
        return {name: int(c) for name, c in zip(label_names, counts)}

    def predictions(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return (sigmoid(logits) >= threshold).astype(np.int64)

    def gold(self, labels: np.ndarray) -> np.ndarray:
        return labels.astype(np.int64)

    def postprocess(self, logits: np.ndarray, label_names: Sequence[str] | None,
                    options: PostprocessOptions = PostprocessOptions()) -> list[dict[str, Any]]:
        answers = []
        for row in sigmoid(logits.astype(np.float64)):
            chosen = [i for i in np.argsort(-row, kind="stable") if row[i] >= options.threshold]
            answers.append({"labels": [label_names[i] for i in chosen], "label_scores": [float(row[i]) for i in chosen],
                            "scores": {name: float(p) for name, p in zip(label_names, row)}})
        return answers

    def prediction_columns(self, frame: pd.DataFrame, gold: np.ndarray, pred: np.ndarray, answers: list[dict],
                           label_names: Sequence[str] | None) -> tuple[list[str], list[bool]]:
        frame["gold"] = [";".join(label_names[i] for i in np.flatnonzero(row)) for row in gold]
        frame["predicted"] = [";".join(a["labels"]) for a in answers]
        frame["score"] = [float(np.mean(a["label_scores"])) if a["labels"] else 0.0 for a in answers]
        # Exact match: a partly right label set still needs a look, so it sorts with the errors.
        frame["correct"] = (gold == pred).all(axis=1)
        return ["correct", "score"], [True, False]

    def extra_artifacts(self, out_dir: Path, gold: np.ndarray, pred: np.ndarray,
                        label_names: Sequence[str] | None) -> list[Path]:
        from finetune.reports import artifacts as A

        return A.write_per_class(out_dir, list(label_names), gold, pred, ("micro", "macro", "weighted"))

    def label_probabilities(self, outputs: Any, settings: TaskSettings) -> np.ndarray:
        return sigmoid(np.asarray(outputs, dtype=np.float64))

    def format_answer(self, item: Any, answer: dict[str, Any]) -> str:
        return f"{','.join(answer['labels']) or '-'}\t{item}"


MULTI_LABEL = MultiLabelTask()
