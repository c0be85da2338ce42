"""The MLflow model registry: register each run's best model and keep the `champion` alias on the best one.

The alias moves to a new version only when that version beats the current champion on the recipe's
`metric_for_best` (in the metric's own direction), and only between models of the same task and label
set, since scores of different label sets are not comparable. Every decision is written as tags on
the new model version and on its run, with both scores.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from finetune.tasks.metrics import is_improvement

CHAMPION = "champion"


def _champion(client: mlflow.MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _signature(task: str, label_names: list[str] | None) -> str:
    return json.dumps({"task": task, "labels": label_names}, ensure_ascii=False)


def register_and_maybe_promote(model_uri: str, run_id: str, name: str, metric: str, score: float,
                               greater_is_better: bool, task: str, label_names: list[str] | None) -> dict[str, Any]:
    """Register `model_uri` as a new version of `name`; make it champion if it beats the current one."""
    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered
    version = str(client.create_model_version(name, model_uri, run_id=run_id, tags={
        "finetune.metric": metric, "finetune.score": str(score), "finetune.signature": _signature(task, label_names),
    }).version)
    current = _champion(client, name)
    decision: str
    previous_score: float | None = None
    if current is None:
        promote, decision = True, "first version: champion"
    elif current.tags.get("finetune.signature") != _signature(task, label_names):
        promote, decision = False, (f"kept version {current.version}: it has another task or label set, "
                                    "so scores are not comparable (use finetune promote to force)")
    elif current.tags.get("finetune.metric") != metric:
        promote, decision = False, (f"kept version {current.version}: it was chosen on {current.tags.get('finetune.metric')}, "
                                    f"not {metric} (use finetune promote to force)")
    else:
        previous_score = float(current.tags["finetune.score"])
        promote = is_improvement(score, previous_score, greater_is_better)
        better = "higher" if greater_is_better else "lower"
        decision = (f"champion: {metric} {score:.4f} beats version {current.version}'s {previous_score:.4f} ({better} is better)"
                    if promote else
                    f"kept version {current.version}: its {metric} {previous_score:.4f} is not beaten by {score:.4f} ({better} is better)")
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    tags = {"finetune.champion_decision": decision, "finetune.champion_promoted": str(promote).lower(),
            "finetune.champion_previous_score": "" if previous_score is None else str(previous_score)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        client.set_tag(run_id, key, value)
    return {"name": name, "version": version, "promoted": promote, "decision": decision,
            "score": score, "previous_score": previous_score}


def promote(run_id: str, name: str | None = None) -> dict[str, Any]:
    """Move the champion alias to the model version made from `run_id` (by hand, whatever the scores)."""
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if name:
        versions = [v for v in versions if v.name == name]
    if not versions:
        raise ValueError(f"run {run_id} has no registered model version"
                         + (f" under {name!r}" if name else "") + "; set tracking.register_as in its recipe")
    if len({v.name for v in versions}) > 1:
        raise ValueError(f"run {run_id} is registered under several names ({sorted({v.name for v in versions})}); give --name")
    version = max(versions, key=lambda v: int(v.version))
    previous = _champion(client, version.name)
    client.set_registered_model_alias(version.name, CHAMPION, version.version)
    note = f"promoted by hand (previous champion: {f'version {previous.version}' if previous else 'none'})"
    client.set_model_version_tag(version.name, version.version, "finetune.champion_decision", note)
    client.set_tag(run_id, "finetune.champion_decision", note)
    return {"name": version.name, "version": str(version.version), "previous": str(previous.version) if previous else None}


def champion_run_ids() -> set[str]:
    """Run ids whose model is the champion of some registered model."""
    client = mlflow.MlflowClient()
    ids = set()
    for model in client.search_registered_models():
        current = _champion(client, model.name)
        if current is not None and current.run_id:
            ids.add(current.run_id)
    return ids


def champion_of(run_id: str, store: str) -> str | None:
    """"NAME version N" when the model made from `run_id` is a registered model's champion in `store`, else None
    (also when the store cannot be read: a question asked before a run, which must not stop it)."""
    from finetune.tracking.store import local_store_file

    path = local_store_file(store)
    if path is not None and not path.exists():
        return None  # no store, no registry: and asking must not create one
    try:
        client = mlflow.MlflowClient(tracking_uri=store)
        for version in client.search_model_versions(f"run_id = '{run_id}'"):
            current = _champion(client, version.name)
            if current is not None and current.run_id == run_id:
                return f"{version.name} version {current.version}"
    except Exception:  # an unreachable or foreign store: nothing to protect that we can know of
        return None
    return None
