"""A seventh task, written in this file alone, trains, evaluates and serves: the task layer is really one place.

The task is ordinal rating (labels in a known order: bad < ok < great), with its own head size (one output per
threshold between neighbouring levels), its own loss (cumulative binary cross-entropy, as in CORAL), its own
metric (mean absolute error in levels), its own answers and its own evaluation file. Nothing outside this file
knows it exists.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pytest

import finetune.tasks.metrics as M
from finetune.config.recipe import Recipe
from finetune.tasks import TASKS, LabelEncoding, PostprocessOptions, TaskSettings, register_task, sigmoid
from finetune.tasks.classification import ClassificationTask
from finetune.tasks.sequence import SequenceTask
from tests.conftest import tiny_recipe

LEVELS = ["bad", "ok", "great"]


class OrdinalRatingTask(SequenceTask):
    name = "ordinal_rating"
    description = "a rating on an ordered scale (cumulative logits: one per step between neighbouring levels)"
    metrics = {m.name: m for m in [
        M.Metric("accuracy", lambda t, p: float(np.mean(t == p))),
        M.Metric("mean_absolute_error", lambda t, p: float(np.mean(np.abs(t - p))), greater_is_better=False),
    ]}
    default_metric = "mean_absolute_error"

    def label_names_from(self, values: Sequence[Any], data: Any) -> list[str]:
        return ClassificationTask().label_names_from(values, data)

    def encode_labels(self, values, label_names, by_position, data) -> LabelEncoding:
        import datasets

        index = {name: i for i, name in enumerate(label_names)}
        ids = [index.get(v) for v in values]
        return LabelEncoding(ids, [v for v, i in zip(values, ids) if i is None], datasets.Value("int64"),
                             f"one of {list(label_names)}")

    def label_counts(self, split, label_names) -> dict[str, Any]:
        counts = np.bincount(np.asarray(split["labels"]), minlength=len(label_names))
        return dict(zip(label_names, counts.tolist()))

    def num_labels(self, label_names) -> int:
        return len(label_names) - 1

    def loss(self, outputs, targets, settings: TaskSettings):
        import torch
        import torch.nn.functional as F

        logits = outputs.logits
        steps = torch.arange(logits.shape[-1], device=logits.device)
        above = (targets["labels"].view(-1, 1) > steps).to(logits.dtype)  # level k is above steps 0..k-1
        return F.binary_cross_entropy_with_logits(logits, above)

    def predictions(self, logits, threshold=0.5) -> np.ndarray:
        return (sigmoid(logits) > 0.5).sum(axis=-1)

    def gold(self, labels) -> np.ndarray:
        return labels.astype(np.int64)

    def postprocess(self, logits, label_names, options=PostprocessOptions()) -> list[dict[str, Any]]:
        levels = self.predictions(logits)
        return [{"rating": label_names[int(level)], "level": int(level),
                 "above": [float(p) for p in sigmoid(row.astype(np.float64))]} for level, row in zip(levels, logits)]

    def prediction_columns(self, frame, gold, pred, answers, label_names):
        frame["gold"] = [label_names[i] for i in gold]
        frame["predicted"] = [a["rating"] for a in answers]
        frame["_distance"] = np.abs(gold - pred)
        return ["_distance"], [False]

    def extra_artifacts(self, out_dir: Path, gold, pred, label_names) -> list[Path]:
        path = out_dir / "levels.csv"
        pd.crosstab(pd.Series(gold, name="gold"), pd.Series(pred, name="predicted")).to_csv(path)
        return [path]


ORDINAL = OrdinalRatingTask()


@pytest.fixture
def ordinal_task():
    register_task(ORDINAL)
    yield ORDINAL
    TASKS.pop(ORDINAL.name)


def _ratings(path: Path, n: int, seed: int) -> Path:
    words = {"bad": ["awful", "dull", "boring", "bad"], "ok": ["fine", "decent", "okay", "average"],
             "great": ["great", "wonderful", "brilliant", "beautiful"]}
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "rating"])
        for _ in range(n):
            level = rng.choice(LEVELS)
            out.writerow([f"the film was {rng.choice(words[level])} and {rng.choice(words[level])}", level])
    return path


def test_a_task_defined_here_trains_evaluates_and_serves(ordinal_task, tiny_checkpoints, tmp_path):
    import mlflow
    import torch
    from fastapi.testclient import TestClient

    from finetune.data.batching import eval_loader
    from finetune.data.features import prepare
    from finetune.models.modeling import load_tokenizer, make_collator
    from finetune.models.predictor import Predictor
    from finetune.training import train
    from serving.app import create_app
    from serving.loading import LoadedModel

    recipe = Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], output_dir=str(tmp_path / "out"),
        data={"files": {"train": str(_ratings(tmp_path / "train.csv", 192, 0)),
                        "validation": str(_ratings(tmp_path / "dev.csv", 48, 1))},
              "text_column": "text", "label_column": "rating", "label_names": LEVELS, "quoting": "minimal",
              "max_train_samples": None, "max_eval_samples": None},
        task={"type": "ordinal_rating"},
        training={"max_steps": 150, "learning_rate": 3e-3, "eval_strategy": "steps", "eval_steps": 50},
        tracking={"log_model": False, "system_metrics": False, "experiment": "ordinal"},
    ))
    assert recipe.task.metric_for_best == "mean_absolute_error"
    result = train.main(recipe)

    # The head has the task's size, and evaluation scored the task's own metrics ...
    predictor = Predictor.from_dir(result.best_dir)
    assert predictor.task is ORDINAL and predictor.model.config.num_labels == 2
    assert set(result.best_metrics) == {"accuracy", "mean_absolute_error", "loss"}
    assert result.best_metrics["accuracy"] > 0.6, result.best_metrics  # the words decide the level: it learned
    # ... with the task's loss: the evaluation loss is the cumulative cross-entropy on the evaluation split (the
    # head alone, with 2 outputs and no problem type, would have computed a squared error or a softmax loss).
    tokenizer = load_tokenizer(result.best_dir)
    data = prepare(recipe, ORDINAL, tokenizer)
    losses = []
    for batch in eval_loader(data.eval, make_collator(tokenizer, predictor.model.config, ORDINAL), 16):
        inputs, targets = ORDINAL.split_batch(batch)
        with torch.no_grad():
            losses += [float(ORDINAL.loss(predictor.model(**inputs), targets, TaskSettings()))] * len(targets["labels"])
    assert np.mean(losses) == pytest.approx(result.best_metrics["loss"], rel=1e-4)

    # Its evaluation file was written and logged with the run.
    logged = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="evaluation")
    assert (Path(logged) / "levels.csv").is_file() and (Path(logged) / "predictions.csv").is_file()

    # It answers over HTTP through the task's own post-processing.
    texts = ["the film was brilliant and wonderful", "the film was awful and boring"]
    expected = predictor.predict(texts)
    loaded = LoadedModel(predictor, "ordinal", None, result.run_id, str(result.best_dir))
    with TestClient(create_app(loaded), base_url="http://127.0.0.1") as client:
        info = client.get("/v1/model").json()
        assert info["task"] == "ordinal_rating" and info["label_names"] == LEVELS
        answered = client.post("/v1/predict", json={"inputs": texts}).json()["predictions"]
    assert [a["rating"] for a in answered] == [a["rating"] for a in expected]
    assert answered[0]["level"] > answered[1]["level"]
    assert all(set(a) == {"rating", "level", "above", "truncated"} for a in answered)


def test_an_unregistered_task_is_refused_by_name(tiny_checkpoints):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="task.type"):
        Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], task={"type": "ordinal_rating"}))
