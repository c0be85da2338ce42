"""`finetune evaluate MODEL DATA`: a trained model's metrics on any labelled data, through its task definition.

The split is tokenised by the task (`Task.features`, as for training's evaluation split), the loaded model
answers every feature (`Predictor.outputs`: PyTorch, bf16 or ONNX Runtime), and the task turns the outputs into
its metrics and evaluation files (`Task.collect`, `evaluation`, `write_artifacts`): the same code that scored
the model while it trained, so on the same split the numbers are the same. The evaluation is logged as an
MLflow run linked to the model (finetune.tracking.evaluation_run).

The output folder (`--output-dir`) is written as finetune.files writes folders: refused, before the model runs,
when it is a link or a non-empty folder finetune did not make; every file is written in a new private folder
beside it and moved into place without following links, and only files an earlier evaluation wrote there (its
`.finetune-output.json` lists them) are replaced.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from finetune.evaluation.data import LabelledData
from finetune.evaluation.extra_metrics import ExtraMetrics
from finetune.errors import EvaluationError
from finetune.evaluation.label_issues import ISSUES_FILE, issue_files, issues_table, require_class_probabilities
from finetune.files import RefusedWrite, check_output_folder, publish_files, staging_folder
from finetune.models.predictor import Predictor
from finetune.tasks import FeatureContext, Reference

FEATURES_PER_CALL = 4096
"""Features given to the model per call: the progress bar moves, and length-grouping still has plenty to sort."""


@dataclass
class Evaluation:
    """A model's metrics on a split, and what the task's evaluation files and label issues are made from."""

    metrics: dict[str, float]
    outputs: Any
    reference: Reference
    examples: int


def features_of(predictor: Predictor, split: datasets.Dataset, data: Any) -> datasets.Dataset:
    """The task's evaluation features of a labelled split (with the columns post-processing reads)."""
    task = predictor.task
    ctx = FeatureContext(data, predictor.tokenizer, predictor.info.max_length, predictor.settings,
                         predictor.info.label_names, train=False)
    return split.map(task.features, fn_kwargs={"ctx": ctx}, batched=True, with_indices=True,
                     remove_columns=[c for c in split.column_names if c not in task.keep_raw_columns],
                     keep_in_memory=True, desc="tokenising")


def model_outputs(predictor: Predictor, features: datasets.Dataset, progress: Any = False) -> list[np.ndarray]:
    """The model's output for every feature, in order (batched by length inside each call).

    progress: False, True (a bar on stderr) or the stream to draw the bar on (the terminal, while the command's
    other output goes to its log: `finetune.cli.console.terminal_stream`)."""
    from tqdm.auto import tqdm

    keys = [k for k in predictor.tokenizer.model_input_names if k in features.column_names]
    rows: list[np.ndarray] = []
    stream = progress if hasattr(progress, "write") else None
    with tqdm(total=len(features), unit="features", desc="evaluating", disable=not progress or None,
              file=stream) as bar:
        for start in range(0, len(features), FEATURES_PER_CALL):
            columns = features.select(range(start, min(start + FEATURES_PER_CALL, len(features)))).select_columns(keys).to_dict()
            batch = [{k: columns[k][i] for k in keys} for i in range(len(columns[keys[0]]))]
            rows += predictor.outputs(batch)
            bar.update(len(batch))
    return rows


def evaluate_split(predictor: Predictor, split: datasets.Dataset, data: Any, extra: ExtraMetrics | None = None,
                   progress: Any = False) -> Evaluation:
    """The task's metrics (and any extra `evaluate` metrics) of a model on a labelled split."""
    task, settings, label_names = predictor.task, predictor.settings, predictor.info.label_names
    features = features_of(predictor, split, data)
    rows = model_outputs(predictor, features, progress)
    targets = [c for c in ("labels",) if c in features.column_names]
    columns = features.select_columns(targets).to_dict() if targets else {}
    per_feature = [{k: columns[k][i] for k in targets} for i in range(len(features))]
    reference = Reference(features, split, data)
    metrics, outputs = task.evaluation(task.collect(rows, per_feature), reference, settings, label_names)
    if extra:
        metrics |= extra.compute(task, outputs, reference, settings)
    return Evaluation(metrics, outputs, reference, len(split))


@dataclass
class EvaluationReport:
    """What `finetune evaluate` made: metrics, files, the MLflow run."""

    metrics: dict[str, float]
    out_dir: Path
    files: list[Path]
    tables: list[Path]
    """The per-class or per-entity-type tables among `files`, for the terminal."""
    run_id: str | None
    issues: Any = None
    issues_path: Path | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


OUTPUT_OPTION = "--output-dir"


def check_evaluation_folder(out_dir: Path | str, overwrite: bool = False) -> None:
    """Refuse, naming it, an output folder evaluate must not write in (a link, a file, a non-empty folder
    finetune did not make, unless `overwrite`); called before the model runs."""
    try:
        check_output_folder(out_dir, OUTPUT_OPTION, overwrite)
    except RefusedWrite as e:
        raise EvaluationError(str(e)) from None


def run_evaluation(located: Any, predictor: Predictor, labelled: LabelledData, out_dir: Path,
                   extra: ExtraMetrics | None = None, find_label_issues: bool = False, experiment: str | None = None,
                   log: bool = True, progress: Any = True, params: dict[str, Any] | None = None,
                   overwrite: bool = False) -> EvaluationReport:
    """Evaluate, write the task's evaluation files (and label issues) to `out_dir`, log the MLflow run.

    `out_dir` must be new, empty or an earlier evaluation's (`check_evaluation_folder`; `overwrite` lets files
    finetune did not write there be replaced); it is checked before the model runs.
    """
    from finetune.tracking.evaluation_run import log_evaluation_run, registry_version

    started = time.perf_counter()
    task, settings, label_names = predictor.task, predictor.settings, predictor.info.label_names
    out_dir = Path(out_dir)
    check_evaluation_folder(out_dir, overwrite)
    if find_label_issues:
        require_class_probabilities(task)
    evaluation = evaluate_split(predictor, labelled.split, labelled.data, extra, progress)
    metrics = dict(evaluation.metrics)
    model = {"source": located.source, "run_id": located.run_id, "name": located.name, "version": located.version,
             "runtime": predictor.runtime, "recipe_name": predictor.info.recipe_name or None}
    if located.run_id and not located.version:
        found = registry_version(located.run_id)
        if found:
            model["name"], model["version"] = found
    stage = staging_folder(out_dir)
    try:
        staged = task.write_artifacts(stage / "evaluation", evaluation.reference, evaluation.outputs, metrics,
                                      label_names, settings)
        tables = [out_dir / f.relative_to(stage) for f in staged if f.suffix == ".md"]
        issues = None
        if find_label_issues:
            issues = issues_table(task, task.label_probabilities(evaluation.outputs, settings), labelled.split,
                                  labelled.data, labelled.rows, label_names, settings.threshold,
                                  predictor.info.text_pair)
            staged += issue_files(issues, stage)
            metrics["label_issues"] = float(len(issues))
        summary = {"model": model, "data": {"name": labelled.name, "source": labelled.source,
                                            "split": labelled.split_name, "examples": evaluation.examples,
                                            "skipped_rows": labelled.skipped_rows, "unknown_labels": labelled.unknown},
                   "task": task.name, "metrics": metrics}
        (stage / "evaluation.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
        try:
            publish_files(stage, out_dir, "evaluation", OUTPUT_OPTION, overwrite)
        except RefusedWrite as e:
            raise EvaluationError(str(e)) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    files = [out_dir / f.relative_to(stage) for f in staged]
    issues_path = out_dir / ISSUES_FILE if issues is not None else None
    seconds = time.perf_counter() - started
    counts = {"examples": float(evaluation.examples), "skipped_rows": float(labelled.skipped_rows),
              "evaluation_seconds": seconds}
    run_id = None
    if log:
        shown_model = f"{model['name']} v{model['version']}" if model["name"] else Path(str(located.source)).name
        run_id = log_evaluation_run(
            run_name=f"evaluate {shown_model} on {labelled.name}", experiment=experiment, model=model,
            data={"name": labelled.name, "source": labelled.source, "split": labelled.split_name,
                  "unknown": labelled.unknown},
            dataset=labelled.split, params={"data.source": labelled.source, "data.split": labelled.split_name,
                                            **(params or {})},
            metrics=metrics | counts, artifacts=out_dir, task=task.name)
    return EvaluationReport(metrics, out_dir, files, tables, run_id, issues, issues_path, seconds,
                            {"model": model})
