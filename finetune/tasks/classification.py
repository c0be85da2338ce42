"""Single-label classification of a text or a text pair: a softmax over the label set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import finetune.tasks.labels as L
import finetune.tasks.metrics as M
import finetune.tasks.imbalance as imbalance
from finetune.tasks.base import LabelEncoding, PostprocessOptions, TaskSettings, softmax
from finetune.tasks.sequence import SequenceTask


class ClassificationTask(imbalance.WeightedLosses, SequenceTask):
    name = "classification"
    description = "single-sentence or sentence-pair classification (softmax over the label set)"
    metrics = M.CLASSIFICATION
    default_metric = "accuracy"
    hf_problem_type = "single_label_classification"
    pipeline_task = "text-classification"
    onnx_export = True
    stratify = True
    calibrates = True
    ranks_label_issues = True

    def label_names_from(self, values: Sequence[Any], data: Any) -> list[str]:
        found = {v for v in values if v is not None}
        L.at_least_two(found, data)
        return L.sorted_values(found)

    def encode_labels(self, values: Sequence[Any], label_names: Sequence[str] | None, by_position: bool,
                      data: Any) -> LabelEncoding:
        import datasets

        index = {name: i for i, name in enumerate(label_names)}
        ids = [L.class_id(v, label_names, index, by_position) for v in values]
        bad = [v for v, i in zip(values, ids) if i is None]
        return LabelEncoding(ids, bad, datasets.ClassLabel(names=list(label_names)),
                             L.allowed_classes(label_names, by_position))

    def label_counts(self, split: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
        counts = np.bincount(np.asarray(split["labels"], dtype=int), minlength=len(label_names))
        return {name: int(c) for name, c in zip(label_names, counts)}

    def predictions(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return logits.argmax(axis=-1)

    def evaluation_warnings(self, reference: Any, outputs: Any, label_names: Sequence[str] | None,
                            settings: TaskSettings) -> list[str]:
        """A model that answers one class whatever the input (MRPC after 60 steps does) has learned nothing yet; its
        accuracy is the class's share, which can look respectable, so it is said in words."""
        pred = self.predictions(np.asarray(outputs))
        gold = self.gold(np.asarray(reference.raw["labels"]))
        if len(pred) < 2 or len(set(pred.tolist())) != 1 or len(set(gold.tolist())) < 2:
            return []
        only = label_names[int(pred[0])]
        share = float((gold == pred[0]).mean())
        return [f"the best model predicts {only!r} for all {len(pred)} evaluation examples ({share:.0%} of them are "
                f"{only!r}): it has not learned to tell the classes apart. Likely causes: too few steps "
                "(training.max_steps, training.num_epochs), a learning rate too high or too low "
                "(training.learning_rate, e.g. 2e-5 to 1e-4), or imbalanced labels (finetune validate shows the "
                "label counts)"]

    def gold(self, labels: np.ndarray) -> np.ndarray:
        return labels.astype(np.int64)

    def postprocess(self, logits: np.ndarray, label_names: Sequence[str] | None,
                    options: PostprocessOptions = PostprocessOptions()) -> list[dict[str, Any]]:
        answers = []
        for row in softmax(logits.astype(np.float64)):
            best = int(row.argmax())
            answer: dict[str, Any] = {"label": label_names[best], "score": float(row[best]),
                                      "scores": {name: float(p) for name, p in zip(label_names, row)}}
            if options.top_k:
                order = np.argsort(-row, kind="stable")[: options.top_k]
                answer["top_k"] = [{"label": label_names[i], "score": float(row[i])} for i in order]
            answers.append(answer)
        return answers

    def prediction_columns(self, frame: pd.DataFrame, gold: np.ndarray, pred: np.ndarray, answers: list[dict],
                           label_names: Sequence[str] | None) -> tuple[list[str], list[bool]]:
        frame["gold"] = [label_names[i] for i in gold]
        frame["predicted"] = [a["label"] for a in answers]
        frame["score"] = [a["score"] for a in answers]
        frame["correct"] = gold == pred
        return ["correct", "score"], [True, False]

    def extra_artifacts(self, out_dir: Path, gold: np.ndarray, pred: np.ndarray,
                        label_names: Sequence[str] | None) -> list[Path]:
        from finetune.reports import artifacts as A

        # Micro averages equal accuracy for single-label data, so only macro and weighted are shown.
        return A.write_per_class(out_dir, list(label_names), gold, pred, ("macro", "weighted")) + [
            A.write_confusion_matrix(out_dir / "confusion_matrix.png", list(label_names), gold, pred)]

    def label_probabilities(self, outputs: Any, settings: TaskSettings) -> np.ndarray:
        return softmax(np.asarray(outputs, dtype=np.float64))

    def format_answer(self, item: Any, answer: dict[str, Any]) -> str:
        return f"{answer['label']}\t{answer['score']:.4f}\t{item}"


CLASSIFICATION = ClassificationTask()
