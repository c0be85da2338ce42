"""The MLflow run of one evaluation (`finetune evaluate`), linked to the model it scored.

The run lives in the experiment of the model's training run and is nested under it (`mlflow.parentRunId`),
so the MLflow UI shows a model's evaluations beneath its training run; its tags name the model's run, its
registry name and version, the data and the split, and `finetune compare` reads them to show each model's
score on every data set it was evaluated on. The data is logged as an MLflow input (source and digest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from finetune.tracking.tracker import tracking_uri, use_experiment

EVALUATION_TAG = "finetune.evaluation"
MODEL_RUN_TAG = "finetune.model_run_id"
MODEL_NAME_TAG = "finetune.model_name"
MODEL_VERSION_TAG = "finetune.model_version"
MODEL_SOURCE_TAG = "finetune.model_source"
DATA_TAG = "finetune.eval_data"
SPLIT_TAG = "finetune.eval_split"
DEFAULT_EXPERIMENT = "evaluations"


def registry_version(run_id: str) -> tuple[str, str] | None:
    """The registered model name and the newest version made from a run, if it was registered."""
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    except Exception:  # a store without a registry
        return None
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    return newest.name, str(newest.version)


def experiment_for(model_run_id: str | None, fallback: str | None) -> tuple[str, str | None]:
    """(experiment id, parent run id): the model's training run's experiment and the run to nest under, or the
    `fallback` experiment (created if needed) with no parent."""
    client = mlflow.MlflowClient()
    if model_run_id:
        try:
            return client.get_run(model_run_id).info.experiment_id, model_run_id
        except Exception:  # the run is in another store (a model folder copied from elsewhere)
            pass
    use_experiment(fallback or DEFAULT_EXPERIMENT)
    return mlflow.get_experiment_by_name(fallback or DEFAULT_EXPERIMENT).experiment_id, None


def log_evaluation_run(*, run_name: str, experiment: str | None, model: dict[str, Any], data: dict[str, Any],
                       dataset: Any, params: dict[str, Any], metrics: dict[str, float], artifacts: Path,
                       task: str) -> str:
    """Log one evaluation; returns its run id.

    `model`: source, run_id, name, version, runtime (None where unknown); `data`: name, source, split;
    `dataset`: the evaluated split (a `datasets.Dataset`) for `mlflow.log_input`; `artifacts`: a folder logged
    as the run's artifacts.
    """
    mlflow.set_tracking_uri(tracking_uri())
    if experiment:
        use_experiment(experiment)
        experiment_id, parent = mlflow.get_experiment_by_name(experiment).experiment_id, None
        if model.get("run_id"):
            try:
                same = mlflow.MlflowClient().get_run(model["run_id"]).info.experiment_id == experiment_id
            except Exception:
                same = False
            parent = model["run_id"] if same else None
    else:
        experiment_id, parent = experiment_for(model.get("run_id"), model.get("recipe_name"))
    tags = {EVALUATION_TAG: "true", "finetune.task": task, MODEL_SOURCE_TAG: str(model["source"]),
            DATA_TAG: data["name"], SPLIT_TAG: data["split"], "finetune.runtime": model.get("runtime") or ""}
    for key, tag in (("run_id", MODEL_RUN_TAG), ("name", MODEL_NAME_TAG), ("version", MODEL_VERSION_TAG)):
        if model.get(key):
            tags[tag] = str(model[key])
    if parent:
        tags["mlflow.parentRunId"] = parent
    if data.get("unknown"):
        tags["finetune.unknown_labels"] = json.dumps(data["unknown"], ensure_ascii=False)[:5000]
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params({k: "null" if v is None else str(v)[:500] for k, v in params.items()})
        mlflow.log_input(mlflow.data.from_huggingface(dataset, path=data["source"], name=data["name"]),
                         context="evaluation")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(artifacts))
        return run.info.run_id


def evaluation_runs(experiment_ids: list[str]) -> list[Any]:
    """Finished evaluation runs of the given experiments, newest first."""
    client = mlflow.MlflowClient()
    return client.search_runs(experiment_ids, filter_string=f"tags.`{EVALUATION_TAG}` = 'true' and "
                                                            "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5000)
