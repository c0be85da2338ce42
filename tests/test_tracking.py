"""MLflow done right: champion, compare, resume into the same run, artifacts, inputs, sweeps, the UI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from finetune.training import train
from finetune.cli import main as cli
from finetune.config.recipe import Recipe
from tests.conftest import DATA, first_rows, tiny_recipe

pytestmark = pytest.mark.e2e


def _recipe(checkpoint: Path, learning_rate: float, **extra) -> Recipe:
    """48 examples evaluated on themselves: a useful learning rate fits them, a tiny one stays near chance."""
    small = Path("small.tsv")  # tests run in their own tmp_path
    if not small.exists():
        first_rows(DATA / "sst2" / "train.tsv", 48, small)
    recipe = tiny_recipe(
        checkpoint,
        data={"files": {"train": str(small), "validation": str(small)}, "max_train_samples": None, "max_eval_samples": None},
        training={"max_steps": None, "num_epochs": 12, "batch_size": 16, "learning_rate": learning_rate,
                  "warmup_ratio": 0.0, "scheduler": "constant", "logging_steps": 3},
        tracking={"experiment": "compare", "log_model": True, "register_as": "sentiment", "system_metrics": False},
    )
    for section, values in extra.items():
        recipe[section] = {**recipe[section], **values}
    return Recipe.model_validate(recipe)


def _alias_version(name: str = "sentiment") -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


def test_champion_moves_only_when_beaten_and_compare_ranks_runs(tiny_checkpoints, tmp_path, capsys):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    weak = train.main(_recipe(tiny_checkpoints["bert"], 1e-9, tracking={"run_name": "weak"}))
    assert _alias_version() == "1", "the first registered version becomes champion"
    strong = train.main(_recipe(tiny_checkpoints["bert"], 3e-3, tracking={"run_name": "strong"}))
    assert strong.best_metrics["accuracy"] > weak.best_metrics["accuracy"]
    assert _alias_version() == "2"
    again = train.main(_recipe(tiny_checkpoints["bert"], 1e-9, tracking={"run_name": "weak-again"}))
    assert _alias_version() == "2", "a worse run must not take the champion alias"

    client = mlflow.MlflowClient()
    kept = client.get_model_version("sentiment", "3")
    assert kept.tags["finetune.champion_promoted"] == "false"
    assert "is not beaten by" in kept.tags["finetune.champion_decision"]
    assert float(kept.tags["finetune.champion_previous_score"]) == pytest.approx(strong.best_metrics["accuracy"])
    assert client.get_run(again.run_id).data.tags["finetune.champion_promoted"] == "false"

    # compare: best first, with the differing hyperparameter shown and the champion marked.
    capsys.readouterr()
    assert cli(["compare", "--experiment", "compare", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows][0] == "strong"
    assert {r["training.learning_rate"] for r in rows} == {"1e-09", "0.003"}
    assert [r["champion"] for r in rows] == ["yes", "", ""]
    assert all(r["train_seconds"] > 0 and r["samples_per_s"] > 0 and r["peak_memory_mb"] > 100 for r in rows)
    assert cli(["compare", "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.splitlines()[0].startswith("| run | run_id | checkpoint | task | accuracy |")

    # The champion loads by alias and predicts label names.
    model = mlflow.pyfunc.load_model("models:/sentiment@champion")
    assert model.predict(["a gripping, beautiful film"])[0]["label"] in {"negative", "positive"}

    # finetune promote moves it by hand.
    assert cli(["promote", weak.run_id]) == 0
    assert _alias_version() == "1"
    assert "promoted by hand" in client.get_model_version("sentiment", "1").tags["finetune.champion_decision"]


def test_champion_is_not_taken_across_label_sets(tiny_checkpoints):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    train.main(_recipe(tiny_checkpoints["bert"], 1e-9))
    other = _recipe(tiny_checkpoints["bert"], 3e-3, data={"label_names": ["bad", "good"]})
    train.main(other)
    version = mlflow.MlflowClient().get_model_version("sentiment", "2")
    assert version.tags["finetune.champion_promoted"] == "false"
    assert "another task or label set" in version.tags["finetune.champion_decision"]
    assert _alias_version() == "1"


class Interrupted(Exception):
    pass


def test_resumed_run_continues_the_same_mlflow_run_and_ends_where_an_uninterrupted_one_does(tiny_checkpoints, tmp_path):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])

    def recipe(out: str) -> Recipe:
        return Recipe.model_validate(tiny_recipe(
            tiny_checkpoints["bert"], output_dir=out,
            training={"max_steps": 12, "batch_size": 8, "eval_strategy": "steps", "eval_steps": 4, "logging_steps": 2},
            tracking={"experiment": "resume", "system_metrics": False},
        ))

    whole = train.main(recipe(str(tmp_path / "whole")))

    def crash(step: int, metrics: dict) -> bool:
        if step == 8:
            raise Interrupted
        return False

    with pytest.raises(Interrupted):
        train.main(recipe(str(tmp_path / "broken")), hooks=train.TrainingHooks(on_evaluate=crash))
    assert (tmp_path / "broken" / "checkpoints" / "step-8" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()) == ["step-4", "step-8"]
    (broken_run,) = [r for r in mlflow.search_runs(experiment_names=["resume"], output_format="list")
                     if r.info.status == "FAILED"]

    resumed = train.main(recipe(str(tmp_path / "broken")), resume_run=True)
    assert resumed.resumed_from == 8
    assert resumed.run_id == broken_run.info.run_id
    run = mlflow.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(resumed.run_id, "train/loss")]
    assert steps == [2, 4, 6, 8, 10, 12], "step numbering continues, nothing logged twice"
    # Model, optimizer, scheduler, RNG and data position were all restored.
    assert resumed.best_metrics == pytest.approx(whole.best_metrics, abs=1e-6)
    assert len(mlflow.search_runs(experiment_names=["resume"], output_format="list")) == 2


@pytest.mark.figures
def test_artifacts_inputs_and_model_card(tiny_checkpoints, tmp_path):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    result = train.main(_recipe(tiny_checkpoints["bert"], 3e-3, tracking={"register_as": None}))
    run = mlflow.get_run(result.run_id)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"learning_curves.png", "MODEL_CARD.md", "evaluation", "model", "recipe.yaml"} <= names
    local = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, dst_path=str(tmp_path / "dl")))
    from PIL import Image

    for png in ["learning_curves.png", "evaluation/confusion_matrix.png"]:
        with Image.open(local / png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
    import pandas as pd

    predictions = pd.read_csv(local / "evaluation" / "predictions.csv")
    assert len(predictions) == 48 and set(predictions["gold"]) <= {"negative", "positive"}
    assert "negative" in (local / "MODEL_CARD.md").read_text()
    assert (result.best_dir / "MODEL_CARD.md").is_file()
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["evaluation", "training"]
    assert all(i.dataset.digest for i in run.inputs.dataset_inputs)


def test_grid_sweep_makes_one_parent_and_nested_trials(tiny_checkpoints, tmp_path):
    from tests.conftest import write_recipe

    path = write_recipe(tmp_path / "sweep.yaml", tiny_recipe(
        tiny_checkpoints["distilbert"], training={"max_steps": 2}, tracking={"experiment": "sweep", "system_metrics": False}))
    assert cli(["sweep", str(path), "--grid", "training.learning_rate=1e-5,3e-5,5e-5"]) == 0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["sweep"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("finetune.sweep_parent") == "true"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["training.learning_rate"] for r in children) == ["1e-05", "3e-05", "5e-05"]
    assert parents[0].data.tags["finetune.best_trial_run_id"] in {r.info.run_id for r in children}
    assert "best/accuracy" in parents[0].data.metrics


def test_optuna_search_with_shared_storage(tiny_checkpoints, tmp_path):
    pytest.importorskip("optuna")
    from tests.conftest import write_recipe

    path = write_recipe(tmp_path / "search.yaml", tiny_recipe(
        tiny_checkpoints["distilbert"], training={"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2},
        tracking={"experiment": "search", "system_metrics": False}))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert cli(["sweep", str(path), "--search", "training.learning_rate=logfloat:1e-5:1e-3", "--trials", "3",
                "--storage", storage, "--study-name", "s"]) == 0
    import optuna

    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 3
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["search"], output_format="list")
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 3


def test_ui_serves_on_loopback(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "finetune"
    proc = subprocess.Popen([str(exe), "ui", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=os.environ.copy(), start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_curves_keep_the_resumed_values_where_a_killed_run_logged_past_its_checkpoint():
    from mlflow.entities import Metric

    from finetune.tracking.tracker import latest_per_step

    # Killed at step 30 after checkpointing at 20: steps 20-30 are trained (and logged) again when resumed.
    first = [Metric("train/loss", v, 1000 + s, s) for s, v in ((10, 0.9), (20, 0.8), (30, 0.75))]
    again = [Metric("train/loss", v, 5000 + s, s) for s, v in ((30, 0.7), (40, 0.6))]
    assert latest_per_step(again + first) == [(10, 0.9), (20, 0.8), (30, 0.7), (40, 0.6)]
