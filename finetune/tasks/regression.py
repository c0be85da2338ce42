"""Regression on a text or a text pair: one real value (e.g. STS-B similarity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import finetune.tasks.metrics as M
from finetune.tasks.base import LabelEncoding, PostprocessOptions, TaskSettings
from finetune.tasks.sequence import SequenceTask


class RegressionTask(SequenceTask):
    name = "regression"
    description = "single-sentence or sentence-pair regression (one real value)"
    metrics = M.REGRESSION
    default_metric = "pearson"
    has_label_names = False
    hf_problem_type = "regression"
    pipeline_task = "text-classification"
    onnx_export = True

    def num_labels(self, label_names: Sequence[str] | None) -> int:
        return 1

    def encode_labels(self, values: Sequence[Any], label_names: Sequence[str] | None, by_position: bool,
                      data: Any) -> LabelEncoding:
        import datasets

        numbers, bad = [], []
        for v in values:
            try:
                numbers.append(float(v))
            except (TypeError, ValueError):
                bad.append(v)
        return LabelEncoding(numbers, bad, datasets.Value("float32"), "a number")

    def label_counts(self, split: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
        values = np.asarray(split["labels"], dtype=float)
        return {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}

    def loss(self, outputs: Any, targets: dict[str, Any], settings: TaskSettings) -> Any:
        import torch.nn.functional as F

        return F.mse_loss(outputs.logits.squeeze(), targets["labels"].squeeze())

    def predictions(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        # float64, as the gold values are: the metrics then compute the same whether given these arrays or
        # the numbers `metric_inputs` hands to an `evaluate` module.
        return logits.reshape(-1).astype(np.float64)

    def gold(self, labels: np.ndarray) -> np.ndarray:
        return labels.reshape(-1).astype(np.float64)

    def postprocess(self, logits: np.ndarray, label_names: Sequence[str] | None,
                    options: PostprocessOptions = PostprocessOptions()) -> list[dict[str, Any]]:
        return [{"value": float(v)} for v in logits.reshape(-1)]

    def prediction_columns(self, frame: pd.DataFrame, gold: np.ndarray, pred: np.ndarray, answers: list[dict],
                           label_names: Sequence[str] | None) -> tuple[list[str], list[bool]]:
        frame["gold"] = gold
        frame["predicted"] = [a["value"] for a in answers]
        frame["score"] = None
        frame["correct"] = None
        frame["_error"] = np.abs(gold - pred)  # largest errors first; dropped before writing
        return ["_error"], [False]

    def extra_artifacts(self, out_dir: Path, gold: np.ndarray, pred: np.ndarray,
                        label_names: Sequence[str] | None) -> list[Path]:
        from finetune.reports import artifacts as A

        return [A.write_scatter(out_dir / "scatter.png", gold, pred)]

    def format_answer(self, item: Any, answer: dict[str, Any]) -> str:
        return f"{answer['value']:.4f}\t{item}"


REGRESSION = RegressionTask()
