"""`finetune compare`: one row per run, best first, with what differs between the runs and each model's score on
every data set `finetune evaluate` scored it on (`finetune compare --evaluations`: one row per evaluation)."""

from __future__ import annotations

import collections
import json
from typing import Any

import mlflow
import pandas as pd

from finetune.files import spreadsheet_frame
from finetune.tracking.evaluation_run import DATA_TAG, EVALUATION_TAG, MODEL_NAME_TAG, MODEL_RUN_TAG, MODEL_SOURCE_TAG, \
    MODEL_VERSION_TAG, SPLIT_TAG
from finetune.tracking.registry import champion_run_ids
from finetune.tracking.tracker import RESOLVED_SUFFIX
from finetune.tasks import TASKS

# Params that identify a run rather than describe how it was trained.
_NOT_HYPERPARAMETERS = {"name", "output_dir", "tracking.run_name", "tracking.experiment", "tracking.tracking_uri"}


PRECISION_PARAM = "training.mixed_precision" + RESOLVED_SUFFIX
"""The precision a run trained in (`Tracker`); runs logged before it was recorded show none."""
PRECISION_NAMES = {"no": "fp32"}


def collect_runs(experiment: str | None, evaluations: bool = False) -> list[Any]:
    """Finished training runs of one experiment (or of all), without sweep parent runs; with `evaluations`, the
    finished evaluation runs (`finetune evaluate`) instead."""
    client = mlflow.MlflowClient()
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            raise ValueError(f"no experiment {experiment!r}; experiments: {', '.join(names) or 'none yet'}")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string="attributes.status = 'FINISHED'", max_results=5000)
    runs = [r for r in runs if r.data.tags.get("finetune.sweep_parent") != "true" and "finetune.task" in r.data.tags]
    return [r for r in runs if (r.data.tags.get(EVALUATION_TAG) == "true") == evaluations]


def evaluation_columns(runs: list[Any], evaluations: list[Any], metric: str) -> dict[str, dict[str, float]]:
    """Per training run id, `{metric} @ {data}` -> the metric of its newest evaluation on each data set."""
    ids = {r.info.run_id for r in runs}
    found: dict[str, dict[str, float]] = {}
    for e in sorted(evaluations, key=lambda e: e.info.start_time):  # newest last, so it wins
        model_run, value = e.data.tags.get(MODEL_RUN_TAG), e.data.metrics.get(metric)
        if model_run in ids and value is not None:
            found.setdefault(model_run, {})[f"{metric} @ {e.data.tags.get(DATA_TAG, '?')}"] = round(value, 4)
    return found


def evaluations_table(experiment: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """One row per evaluation run, newest first: the model, the data and split, and the metric (default: the
    evaluated task's main metric)."""
    rows = []
    names = {r.info.run_id: r.info.run_name for r in collect_runs(experiment)}
    for e in sorted(collect_runs(experiment, evaluations=True), key=lambda e: -e.info.start_time):
        tags = e.data.tags
        shown = metric or TASKS[tags["finetune.task"]].default_metric if tags.get("finetune.task") in TASKS else metric
        value = e.data.metrics.get(shown) if shown else None
        model = f"{tags[MODEL_NAME_TAG]} v{tags.get(MODEL_VERSION_TAG, '?')}" if tags.get(MODEL_NAME_TAG) else ""
        rows.append({"evaluation_run_id": e.info.run_id, "model_run": names.get(tags.get(MODEL_RUN_TAG), tags.get(MODEL_RUN_TAG, "")),
                     "model": model or tags.get(MODEL_SOURCE_TAG, ""), "task": tags.get("finetune.task"),
                     "data": tags.get(DATA_TAG), "split": tags.get(SPLIT_TAG), "examples": _int(e.data.metrics.get("examples")),
                     "metric": shown, "value": None if value is None else round(value, 4),
                     "runtime": tags.get("finetune.runtime", ""),
                     "evaluated": pd.Timestamp(e.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M")})
    return pd.DataFrame(rows)


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def compare_table(experiment: str | None = None, metric: str | None = None) -> tuple[pd.DataFrame, str]:
    """The comparison as a DataFrame sorted best first, and the metric it is sorted on."""
    runs = collect_runs(experiment)
    if not runs:
        return pd.DataFrame(), metric or ""
    if metric is None:
        metric = collections.Counter(r.data.params.get("task.metric_for_best") for r in runs).most_common(1)[0][0]
    tasks = {r.data.tags["finetune.task"] for r in runs}
    greater = all(TASKS[t].greater_is_better(metric) for t in tasks if metric in TASKS[t].metrics)
    keys = sorted({k for r in runs for k in r.data.params} - _NOT_HYPERPARAMETERS - {PRECISION_PARAM})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    champions = champion_run_ids()
    scores = evaluation_columns(runs, collect_runs(experiment, evaluations=True), metric)
    rows = []
    for r in runs:
        value = r.data.metrics.get(f"best/{metric}")
        seconds = r.data.metrics.get("train/runtime_seconds")
        row = {
            "run": r.info.run_name, "run_id": r.info.run_id, "checkpoint": r.data.params.get("model.checkpoint"),
            "task": r.data.tags["finetune.task"], metric: None if value is None else round(value, 4),
            # Always shown: `mixed_precision: auto` resolves per machine, and it moves the metric.
            "precision": PRECISION_NAMES.get(r.data.params.get(PRECISION_PARAM, ""), r.data.params.get(PRECISION_PARAM, "")),
            **{k: r.data.params.get(k) for k in differing},
            "train_seconds": None if seconds is None else round(seconds, 1),
            "samples_per_s": _round(r.data.metrics.get("train/samples_per_second_overall")),
            "peak_memory_mb": _round(r.data.metrics.get("train/peak_memory_mb")),
            "champion": "yes" if r.info.run_id in champions else "",
            **scores.get(r.info.run_id, {}),
        }
        if any("finetune.parent_model" in other.data.tags for other in runs):
            row["parent"] = r.data.tags.get("finetune.parent_model", "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["_missing"] = frame[metric].isna()
    frame = frame.sort_values(["_missing", metric], ascending=[True, not greater]).drop(columns="_missing")
    return frame.reset_index(drop=True), metric


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def render(frame: pd.DataFrame, fmt: str) -> str:
    """The table as text: table (aligned columns), markdown, csv or json."""
    if frame.empty:
        return "no finished runs" if fmt in ("table", "markdown") else ("" if fmt == "csv" else "[]")
    if fmt == "csv":  # opened in spreadsheets: run names, params and tags are text, never formulas
        return spreadsheet_frame(frame).to_csv(index=False)
    if fmt == "json":
        return json.dumps(json.loads(frame.to_json(orient="records")), indent=2, ensure_ascii=False)
    cells = frame.astype(object).where(frame.notna(), "").astype(str)
    if fmt == "markdown":
        # Written out here because pandas' to_markdown needs the optional tabulate package.
        header = "| " + " | ".join(cells.columns) + " |"
        rule = "|" + "|".join("---" for _ in cells.columns) + "|"
        lines = ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells.itertuples(index=False)]
        return "\n".join([header, rule, *lines])
    # pandas pads by character count unless told that Hangul and other East Asian wide characters take two
    # columns of a terminal; with it, a Korean run name or label keeps the columns lined up.
    with pd.option_context("display.unicode.east_asian_width", True):
        return cells.to_string(index=False)
