"""End to end, as a user runs it: the CLI in a subprocess, a real MLflow store, the logged model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from finetune.config.recipe import flatten, load_recipe
from tests.conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = BIN / "finetune"
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "finetune", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def _runs(experiment: str):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_run_logs_params_metrics_recipe_and_a_predicting_model(tiny_checkpoints, tmp_path, capsys):
    recipe = tiny_recipe(
        tiny_checkpoints["bert"],
        training={"max_steps": 8, "eval_strategy": "steps", "eval_steps": 4, "logging_steps": 2},
        tracking={"log_model": True, "experiment": "e2e"},
    )
    path = write_recipe(tmp_path / "tiny.yaml", recipe, "finetune run tiny.yaml")
    done = _cli("run", str(path), "training.learning_rate=2e-3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # The terminal names the override as parsed; the resolved recipe is saved beside the run's log (and shown with
    # --verbose, tests/test_terminal.py).
    run_dir = tmp_path / "runs" / "tiny-classification"
    assert "learning_rate: 0.002" in done.stdout and "learning_rate: 0.002" in (run_dir / "recipe.yaml").read_text()
    assert "# resolved recipe" in (run_dir / "run.log").read_text()
    assert "MLflow: experiment" in done.stdout

    (run,) = _runs("e2e")
    assert run.info.status == "FINISHED"
    # Every key of the resolved recipe is a param, nothing dropped, and every automatic choice as `<key>.resolved`.
    resolved = load_recipe(path, ["training.learning_rate=2e-3"])
    expected = {k: ("null" if v is None else str(v)) for k, v in flatten(resolved.model_dump(mode="json")).items()}
    decided = {k: v for k, v in run.data.params.items() if k.endswith(".resolved")}
    # ... and, beside them, what was measured of the data before training: the tokenizer's fit (tokenizer.*).
    measured = {k: v for k, v in run.data.params.items() if k.startswith("tokenizer.")}
    assert {"tokenizer.pieces_per_word", "tokenizer.unk_share", "tokenizer.fit"} <= measured.keys()
    assert {k: v for k, v in run.data.params.items() if k not in decided and k not in measured} == expected
    assert {"training.mixed_precision.resolved", "training.threads.resolved", "model.pad_to_multiple_of.resolved",
            "model.pooling.resolved"} <= decided.keys()
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4, 6, 8]
    evals = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert [m.step for m in evals] == [4, 8]
    assert "best/accuracy" in run.data.metrics and "train/learning_rate" in run.data.metrics
    assert run.data.tags["finetune.task"] == "classification"
    # The resolved recipe is an artifact too.
    recipe_file = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/recipe.yaml", dst_path=str(tmp_path / "dl"))
    assert yaml.safe_load(Path(recipe_file).read_text())["training"]["learning_rate"] == 2e-3

    # The logged model predicts label names through pyfunc, in this process ...
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    answers = model.predict(["a gripping, beautiful film", "a dull mess"])
    assert [a["label"] in {"negative", "positive"} for a in answers] == [True, True]
    assert abs(sum(answers[0]["scores"].values()) - 1) < 1e-6
    assert model.metadata.signature is not None
    # ... and through the CLI, by run id, matching the saved folder exactly (that one in this process).
    from finetune.cli import main

    by_run = _cli("predict", run.info.run_id, "a gripping, beautiful film", cwd=tmp_path)
    assert by_run.returncode == 0, by_run.stderr[-2000:]
    for bar in ("Loading weights", "Downloading artifacts"):  # the libraries' loading bars bury the answer
        assert bar not in by_run.stderr, by_run.stderr
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "runs" / "tiny-classification" / "best"), "a gripping, beautiful film"]) == 0
    by_dir = capsys.readouterr().out
    assert by_run.stdout.strip().splitlines()[-1] == by_dir.strip().splitlines()[-1]
    assert by_run.stdout.strip().splitlines()[-1].split("\t")[0] == answers[0]["label"]


def test_rerun_reads_the_tokenisation_cache(tiny_checkpoints, tmp_path, capsys):
    from finetune.cli import main

    path = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_checkpoints["distilbert"], training={"max_steps": 2}))
    assert main(["run", str(path)]) == 0  # the first run in this process; the rerun as a user's second command
    assert "tokenised data built" in capsys.readouterr().out
    second = _cli("run", str(path), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "tokenised data from cache" in second.stdout
    assert "tokenising" not in second.stderr


def test_bad_recipe_exits_non_zero_with_the_field(tmp_path, tiny_checkpoints):
    path = write_recipe(tmp_path / "bad.yaml", tiny_recipe(tiny_checkpoints["bert"], training={"warmup": 3}))
    done = _cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert "training.warmup: unknown key" in done.stderr
    assert "Traceback" not in done.stderr


def test_two_processes_match_one_process_on_the_same_global_batch(tiny_checkpoints, tmp_path):
    """accelerate launch with 2 CPU processes x batch 8 against 1 process x batch 16 (same global batch)."""
    from tests.conftest import ROOT

    def recipe(name: str, batch: int):
        return write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(
            tiny_checkpoints["bert"], name=name, output_dir=str(tmp_path / name),
            training={"max_steps": 8, "batch_size": batch, "eval_strategy": "steps", "eval_steps": 4,
                      "keep_checkpoints": True},  # to read each process's random state below
            tracking={"experiment": "ddp", "log_model": True, "system_metrics": False}))

    config = ROOT / "recipes" / "accelerate" / "cpu-2proc.yaml"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "-m", "finetune", "run", str(recipe("two", 8))]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("training 8 steps") == 1, "only the main process reports"
    assert "with 2 processes" in done.stdout
    from finetune.cli import main

    assert main(["run", str(recipe("one", 16))]) == 0  # the one-process reference, in this process

    runs = {r.data.params["name"]: r for r in _runs("ddp")}
    assert set(runs) == {"one", "two"}, "one MLflow run per training, whatever the number of processes"
    assert runs["two"].info.status == "FINISHED"
    assert (tmp_path / "two" / "best" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-8").glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]
    # Same data order and global batch; only dropout draws differ between the two set-ups.
    TOLERANCE = 0.02
    assert abs(runs["two"].data.metrics["best/loss"] - runs["one"].data.metrics["best/loss"]) <= TOLERANCE
