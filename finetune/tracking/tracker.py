"""MLflow logging for a run: params, curves, artifacts and the best model.

Only the main process of a distributed run talks to MLflow; the others get a `NullTracker`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from finetune.config.recipe import Recipe, flatten, recipe_to_yaml
from finetune.tracking.mlflow_model import build_mlflow_model

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
UNSENT_METRICS_FILE = "mlflow_unsent_metrics.jsonl"
"""Written to output_dir when metrics could not reach MLflow during a run."""


def tracking_uri(recipe: Recipe | None = None) -> str:
    """The recipe's tracking URI, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    if recipe is not None and recipe.tracking.tracking_uri:
        return recipe.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, the `mlruns` folder beside its database file (as a file URI); None for other stores.

    MLflow's own default is `./mlruns` in whatever directory the experiment happens to be created from, so a
    store would scatter its artifacts over every folder a run was started in.
    """
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / "mlruns").as_uri()


def use_experiment(name: str) -> None:
    """Make `name` the active MLflow experiment, creating it (artifacts beside a SQLite store) if needed."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(name, artifact_location=local_artifact_root(mlflow.get_tracking_uri()))
        except MlflowException:  # created meanwhile by another process: use theirs
            pass
    mlflow.set_experiment(name)


def recipe_params(recipe: Recipe) -> tuple[dict[str, str], dict[str, str]]:
    """Every recipe key as an MLflow param; values too long for a param are cut and named in a tag.

    The whole recipe is also logged as recipe.yaml, so a cut value is never lost.
    """
    params, cut = {}, {}
    for key, value in flatten(recipe.model_dump(mode="json")).items():
        text = "null" if value is None else str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            cut[key] = f"{len(text)} characters; full value in recipe.yaml"
            text = text[: MAX_PARAM_VAL_LENGTH - 20] + "...[cut]"
        params[key] = text
    return params, cut


RESOLVED_SUFFIX = ".resolved"


def resolved_params(resolved: dict[str, str]) -> dict[str, str]:
    """What a run's automatic settings resolved to, as MLflow params: `training.mixed_precision` ->
    `training.mixed_precision.resolved` (values longer than a param holds are cut; recipe.yaml does not have them,
    but they are only ever per-label weights, which the model's finetune.json keeps whole)."""
    return {f"{key}{RESOLVED_SUFFIX}": value if len(value) <= MAX_PARAM_VAL_LENGTH else value[: MAX_PARAM_VAL_LENGTH - 20]
            + "...[cut]" for key, value in resolved.items()}


def latest_per_step(history: list[Metric]) -> list[tuple[int, float]]:
    """A metric's (step, value) curve with one value per step: the last one logged.

    A run killed after its last checkpoint has already logged values for steps it then trains again when
    resumed; MLflow keeps both (it cannot delete points), and the resumed values are the ones that lead to
    the final model, so the curves drawn from the history keep those.
    """
    latest: dict[int, Metric] = {}
    for m in history:
        if m.step not in latest or m.timestamp >= latest[m.step].timestamp:
            latest[m.step] = m
    return [(step, latest[step].value) for step in sorted(latest)]


def _unreachable(error: BaseException) -> bool:
    """Whether an MLflow client error is the server being unreachable (MLflow wraps the transport's error in its
    own, so look along the chain), not an error the server answered with."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                             TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return "Max retries exceeded" in str(error) or "Connection refused" in str(error)


class Tracker:
    """One MLflow run for one training run (continued, not duplicated, when the training resumes)."""

    def __init__(self, recipe: Recipe, extra_tags: dict[str, str] | None = None, run_id: str | None = None,
                 nested: bool = False, resolved: dict[str, str] | None = None):
        """Start (or, with `run_id`, continue) the run. A new run logs every recipe key as a param, plus what the
        automatic ones resolved to (`resolved`: key -> value, logged as `<key>.resolved`; see `resolved_params`)."""
        self.recipe = recipe
        # A tracking server that goes away must not stall training for minutes in the client's retries.
        for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
            os.environ.setdefault(key, value)
        self.unsent: list[Metric] = []
        self.failures: list[str] = []
        self.local_history: dict[str, list[tuple[int, float]]] = {}
        self._retry_after = 0.0
        mlflow.set_tracking_uri(tracking_uri(recipe))
        if run_id is None:
            use_experiment(recipe.tracking.experiment or recipe.name)
        # MLflow's generated names come from the global random state, which the seed fixes, so every
        # run of a recipe would get the same name; a timestamp tells them apart.
        name = recipe.tracking.run_name or f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run = mlflow.start_run(
            run_id=run_id, run_name=None if run_id else name, nested=nested,
            log_system_metrics=recipe.tracking.system_metrics,
        )
        self.run_id = self.run.info.run_id
        if run_id is not None:
            mlflow.set_tag("finetune.resumed", "true")
            return  # params and recipe were logged when the run started
        params, cut = recipe_params(recipe)
        mlflow.log_params({**params, **resolved_params(resolved or {})})
        tags = {"finetune.recipe": recipe.name, "finetune.task": recipe.task.type,
                "finetune.checkpoint": recipe.model.checkpoint, **(extra_tags or {})}
        tags.update({f"finetune.param_cut.{k}": v for k, v in cut.items()})
        mlflow.set_tags(tags)
        mlflow.log_text(recipe_to_yaml(recipe), "recipe.yaml")

    def log_inputs(self, data: Any) -> None:
        """Record the training and evaluation data (source and content digest) with the run."""
        self.guarded("log inputs", self._log_inputs, data)

    def _log_inputs(self, data: Any) -> None:
        source = self.recipe.data.files or f"{self.recipe.data.dataset}/{self.recipe.data.dataset_config or ''}"
        for split, context in ((data.raw_train, "training"), (data.raw_eval, "evaluation")):
            dataset = mlflow.data.from_huggingface(split, path=json.dumps(source), name=f"{self.recipe.name}-{context}")
            mlflow.log_input(dataset, context=context)

    def log_parent(self, source: str, run_id: str | None, task: str, head_reused: bool | None) -> None:
        """Record the fine-tuned model this run started from as an input of the run (context `parent_model`), beside
        the `finetune.parent_model` tag, so the MLflow UI shows the lineage."""
        def log() -> None:
            from mlflow.data.code_dataset_source import CodeDatasetSource
            from mlflow.data.meta_dataset import MetaDataset

            tags = {"model": source, "run_id": run_id or "", "task": task,
                    "head": "reused" if head_reused else "replaced"}
            mlflow.log_input(MetaDataset(CodeDatasetSource(tags), name=f"parent model {source}"), context="parent_model",
                             tags={"finetune.parent_model": source})

        self.guarded("log the parent model", log)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics; anything that is not a number is an error rather than silently dropped.

        When the tracking server cannot be reached, metrics are kept and sent with a later call, so
        training goes on; what never gets through is written next to the model at the end.
        """
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        dropped = set(metrics) - set(scalars)
        if dropped:
            raise TypeError(f"metrics must be numbers; not loggable: {sorted(dropped)}")
        now = int(time.time() * 1000)
        for name, value in scalars.items():
            self.local_history.setdefault(name, []).append((step, value))
            self.unsent.append(Metric(name, value, now, step))
        self.flush()

    def flush(self) -> bool:
        """Send buffered metrics; after a failure, try again only every 30 seconds. True when nothing is left."""
        if not self.unsent or time.monotonic() < self._retry_after:
            return not self.unsent
        client = mlflow.MlflowClient()
        try:
            while self.unsent:
                client.log_batch(self.run_id, metrics=self.unsent[:1000])
                del self.unsent[:1000]
        except Exception as e:  # any transport or server error: keep the metrics, keep training
            if not self.failures:
                log.warning(f"MLflow at {tracking_uri(self.recipe)} cannot be reached ({type(e).__name__}); "
                            "training goes on and metrics are kept to send later")
            self.failures.append(f"log metrics: {type(e).__name__}: {str(e)[:200]}")
            self._retry_after = time.monotonic() + 30
            return False
        return True

    def guarded(self, what: str, action, *args, **kwargs):
        """Run one MLflow call; a failure is recorded and reported at the end instead of ending the run.

        Once the server could not be reached, calls are not tried again for 30 seconds (as metrics are not): each
        try costs the client's retries and timeouts, so a run whose server is gone would otherwise stall at its end,
        call after call, before saying so."""
        if time.monotonic() < self._retry_after:
            self.failures.append(f"{what}: not tried, MLflow could not be reached moments before")
            return None
        try:
            return action(*args, **kwargs)
        except Exception as e:
            self.failures.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
            if _unreachable(e):
                self._retry_after = time.monotonic() + 30
            return None

    def report_failures(self, output_dir: str | Path) -> str | None:
        """After the run: a message about what did not reach MLflow (unsent metrics saved as JSON lines)."""
        self._retry_after = 0.0
        self.flush()
        if not self.failures:
            return None
        lines = [f"MLflow at {tracking_uri(self.recipe)} failed during this run ({len(self.failures)} failed call(s); "
                 f"first: {self.failures[0]})."]
        if self.unsent:
            path = Path(output_dir) / UNSENT_METRICS_FILE
            with open(path, "w") as f:
                for m in self.unsent:
                    f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
            lines.append(f"{len(self.unsent)} metric values were not logged to run {self.run_id}; they are in {path}.")
        lines.append(f"The trained model is on disk in {Path(output_dir) / 'best'}.")
        return " ".join(lines)

    def history(self) -> dict[str, list[tuple[int, float]]]:
        """Every metric's (step, value) series, read back from MLflow so a resumed run's curves are whole
        (this process's own values when MLflow cannot be reached)."""
        def read() -> dict[str, list[tuple[int, float]]]:
            client = mlflow.MlflowClient()
            run = client.get_run(self.run_id)
            return {name: latest_per_step(client.get_metric_history(self.run_id, name)) for name in run.data.metrics}

        found = (self.guarded("read metric history", read) if not self.unsent else None) or self.local_history
        return {k: v for k, v in found.items() if k.startswith(("train/loss", "eval/"))}

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.guarded("set tags", mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_artifacts(self, folder: Path) -> None:
        self.guarded("log artifacts", mlflow.log_artifacts, str(folder))

    def log_best_model(self, model_dir: Path) -> str | None:
        """Log the best model as an MLflow model; returns its URI (runs:/<id>/model), or None if MLflow failed."""
        def log() -> str:
            with tempfile.TemporaryDirectory() as tmp:
                build_mlflow_model(Path(model_dir), Path(tmp) / "model")
                mlflow.log_artifacts(str(Path(tmp) / "model"), artifact_path="model")
            return f"runs:/{self.run_id}/model"

        return self.guarded("log the model", log)

    def end(self, status: str = "FINISHED") -> None:
        self.guarded("end the run", mlflow.end_run, status=status)

    @property
    def url_hint(self) -> str:
        return f"experiment {self.run.info.experiment_id}, run {self.run_id} in {tracking_uri(self.recipe)}"


class NullTracker:
    """Stands in for the Tracker on processes that must not log (all but the main one)."""

    run_id = None
    url_hint = ""

    failures: list[str] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def guarded(self, what: str, action, *args, **kwargs):
        return None

    def report_failures(self, output_dir: str | Path) -> str | None:
        return None

    def log_inputs(self, data: Any) -> None:
        pass

    def log_parent(self, source: str, run_id: str | None, task: str, head_reused: bool | None) -> None:
        pass

    def history(self) -> dict[str, list[tuple[int, float]]]:
        return {}

    def log_artifacts(self, folder: Path) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_best_model(self, model_dir: Path) -> str:
        return ""

    def end(self, status: str = "FINISHED") -> None:
        pass
