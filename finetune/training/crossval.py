"""`finetune label-issues RECIPE --folds K`: label errors in a recipe's training data, from out-of-fold predictions.

The training split (after `data.max_train_samples`) is cut into K folds (stratified by label for
classification). For each fold a model is trained with the recipe on the other K-1 folds (its evaluation split
carved from them, so the held-out fold never picks a checkpoint) and predicts the held-out fold; every example
then has a prediction from a model that never saw it, which is what cleanlab's confident learning needs
(finetune.evaluation.label_issues). Each fold is a nested MLflow run under one parent run that gets the ranked
issues (`label_issues.csv`) and the out-of-fold metrics.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import pandas as pd

from finetune.config.recipe import Recipe
from finetune.data.loading import check_columns, encode_labels, load_raw, resolve_label_names
from finetune.errors import RecipeError
from finetune.evaluation.evaluate import evaluate_split
from finetune.evaluation.label_issues import check_issues_folder, issues_table, require_class_probabilities, write_issues
from finetune.models.predictor import Predictor
from finetune.tasks import TaskSettings, get_task
from finetune.threads import ThreadBudget
from finetune.tracking.tracker import tracking_uri, use_experiment
from finetune.training import train

ROW = "_row"


@dataclass
class CrossValidationReport:
    issues: pd.DataFrame
    issues_path: Path
    metrics: dict[str, float]
    """Out-of-fold metrics over the whole training split (each example scored by the fold model that never saw it)."""
    fold_metrics: list[dict[str, float]]
    run_id: str | None
    examples: int
    seconds: float


def fold_indices(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The held-out positions of each fold: stratified by class for single labels when every class has at least
    `folds` examples, else at random."""
    from sklearn.model_selection import KFold, StratifiedKFold

    positions = np.arange(len(labels))
    if labels.ndim == 1 and np.bincount(labels.astype(int)).min(initial=folds) >= folds:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return [held for _, held in splitter.split(positions, labels)]
    return [held for _, held in KFold(n_splits=folds, shuffle=True, random_state=seed).split(positions)]


def training_split(recipe: Recipe, task: Any) -> tuple[list[str], Any]:
    """The recipe's labelled training split as training reads it (after max_train_samples), each row tagged with
    its position in the data (`_row`)."""
    raw = load_raw(recipe.data)
    check_columns(raw, recipe.data, task)
    label_names = resolve_label_names(raw[recipe.data.train_split], recipe.data, task)
    train_split = raw[recipe.data.train_split]
    train_split = train_split.add_column(ROW, list(range(len(train_split))))
    train_split = encode_labels(train_split, recipe.data, task, label_names, recipe.data.train_split)
    cap = recipe.data.max_train_samples
    if cap and cap < len(train_split):
        train_split = train_split.shuffle(seed=recipe.training.seed).select(range(cap))
    return label_names, train_split


def fold_recipe(recipe: Recipe, k: int, folds: int, train_file: Path, label_names: list[str]) -> Recipe:
    """The recipe of fold k: its training data is the other folds' rows (label names, not ids, so every fold
    reads them the same way), evaluation carved from them, nothing registered or logged as a model."""
    data = recipe.data
    values = recipe.model_dump(mode="json")
    values["name"] = f"{recipe.name}-fold{k + 1}of{folds}"
    # Not inside the default output folder of the issues (OUTPUT_DIR-label-issues), which must hold only them.
    values["output_dir"] = f"{recipe.output_dir}-label-issues-folds/fold-{k + 1}"
    values["data"] = {"files": {"train": str(train_file)}, "text_column": "text", "label_column": "label",
                      "label_names": list(label_names), "label_separator": data.label_separator,
                      "validation_size": data.validation_size}
    if data.text_pair_column:
        values["data"]["text_pair_column"] = "text_pair"
    values["tracking"] |= {"log_model": False, "register_as": None, "run_name": f"{recipe.name} fold {k + 1}/{folds}",
                           "experiment": recipe.tracking.experiment or recipe.name}
    return Recipe.model_validate(values)


def _fold_file(split: Any, recipe: Recipe, label_names: list[str], target: Path) -> Path:
    labels = split["labels"]
    frame = pd.DataFrame({"text": ["" if t is None else str(t) for t in split[recipe.data.text_column]]})
    if recipe.data.text_pair_column:
        frame["text_pair"] = ["" if t is None else str(t) for t in split[recipe.data.text_pair_column]]
    if np.asarray(labels).ndim == 2:
        frame["label"] = [[label_names[i] for i in np.flatnonzero(row)] for row in labels]
    else:
        frame["label"] = [label_names[int(i)] for i in labels]
    frame.to_parquet(target, index=False)
    return target


def _out_of_fold_metrics(task: Any, probs: np.ndarray, labels: np.ndarray, settings: TaskSettings) -> dict[str, float]:
    """The task's metrics of the out-of-fold predictions (the probabilities as logits: log-odds for sigmoid tasks,
    log-probabilities for softmax ones, which the task reads back to the same predictions)."""
    clipped = np.clip(probs, 1e-12, 1 - 1e-12)
    logits = np.log(clipped) - np.log1p(-clipped) if labels.ndim == 2 else np.log(clipped)
    return task.compute_metrics(logits, labels, settings.threshold)


def label_issues(recipe: Recipe, folds: int, out_dir: Path, overwrite: bool = False,
                 on_fold: Callable[[int, dict[str, float]], None] | None = None) -> CrossValidationReport:
    """Train `folds` models, predict each held-out fold, rank the label issues of the whole training split.

    `out_dir` is checked before the first model trains (`check_issues_folder`), not after the K trainings.
    `on_fold(k, metrics)` is told when the folds start (k = -1) and each fold's held-out metrics: the terminal's
    lines and bar (the folds' own training reports nothing)."""
    if folds < 2:
        raise RecipeError(f"--folds: {folds}; cross-validation needs at least 2 folds")
    task = get_task(recipe.task.type)
    require_class_probabilities(task)
    check_issues_folder(out_dir, overwrite)
    started = time.perf_counter()
    settings = TaskSettings.of(recipe.task)
    label_names, split = training_split(recipe, task)
    if len(split) < 2 * folds:
        raise RecipeError(f"--folds: {folds} folds need at least {2 * folds} training examples; the recipe has {len(split)}")
    labels = np.asarray(split["labels"])
    held_out = fold_indices(labels, folds, recipe.training.seed)
    probs = np.zeros((len(split), len(label_names)))
    fold_metrics: list[dict[str, float]] = []
    mlflow.set_tracking_uri(tracking_uri(recipe))
    use_experiment(recipe.tracking.experiment or recipe.name)
    out_dir = Path(out_dir)
    if on_fold is not None:
        on_fold(-1, {})
    with mlflow.start_run(run_name=f"{recipe.name} label issues ({folds} folds)",
                          tags={"finetune.label_issues": "true", "finetune.label_issues_task": task.name}) as parent, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({"folds": folds, "examples": len(split), "recipe": recipe.name})
        for k, held in enumerate(held_out):
            rest = np.setdiff1d(np.arange(len(split)), held)
            train_file = _fold_file(split.select(rest), recipe, label_names, Path(tmp) / f"fold-{k + 1}.parquet")
            result = train.main(fold_recipe(recipe, k, folds, train_file, label_names), nested=True)
            predictor = Predictor.from_dir(result.best_dir, batch_size=recipe.training.eval_batch_size)
            if recipe.training.threads:  # the folds' predictions as the folds trained; else the process's budget
                predictor.threads = ThreadBudget(recipe.training.threads)
            evaluation = evaluate_split(predictor, split.select(held), recipe.data)
            probs[held] = task.label_probabilities(evaluation.outputs, settings)
            fold_metrics.append(evaluation.metrics)
            if on_fold is not None:
                on_fold(k, evaluation.metrics)
            mlflow.log_metrics({f"fold_{k + 1}/{name}": value for name, value in evaluation.metrics.items()})
        metrics = _out_of_fold_metrics(task, probs, labels, settings)
        issues = issues_table(task, probs, split, recipe.data, list(split[ROW]), label_names, settings.threshold,
                              recipe.data.text_pair_column is not None)
        issues_path = write_issues(issues, out_dir, overwrite)
        mlflow.log_metrics({f"out_of_fold/{k}": v for k, v in metrics.items()} | {"label_issues": float(len(issues))})
        mlflow.log_artifacts(str(out_dir))
        run_id = parent.info.run_id
    return CrossValidationReport(issues, issues_path, metrics, fold_metrics, run_id, len(split),
                                 time.perf_counter() - started)
