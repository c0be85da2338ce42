"""Faults: a training run killed with SIGKILL resumes and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import tiny_recipe, wait_for_http, write_recipe

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _recipe(tiny_checkpoints, tmp_path, name: str) -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(
        tiny_checkpoints["bert"], name=name, output_dir=str(tmp_path / name),
        data={"max_train_samples": 512},
        training={"max_steps": 40, "batch_size": 8, "eval_strategy": "steps", "eval_steps": 8, "logging_steps": 4},
        tracking={"experiment": "faults", "system_metrics": False},
    ))


def _run(path: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "finetune"), "run", str(path)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())


def test_sigkill_mid_run_then_rerun_resumes_in_the_same_mlflow_run(tiny_checkpoints, tmp_path):
    from finetune.config.recipe import load_recipe
    from finetune.training import train

    train.main(load_recipe(_recipe(tiny_checkpoints, tmp_path, "whole")))  # the reference, uninterrupted, in this process

    path = _recipe(tiny_checkpoints, tmp_path, "killed")
    victim = _run(path, tmp_path)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "step-16").is_dir():  # killed after its second checkpoint, mid-training
        assert victim.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert not (checkpoints / "step-40").exists()

    again = _run(path, tmp_path)  # the same command, no flag: it continues the interrupted run
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    assert "resumed at step" in out

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_id: r for r in mlflow.search_runs(experiment_names=["faults"], output_format="list")}
    assert len(runs) == 2, "the resumed training continues its MLflow run instead of starting a new one"
    killed = [r for r in runs.values() if r.data.tags.get("finetune.resumed") == "true"]
    assert len(killed) == 1 and killed[0].info.status == "FINISHED"
    reference = [r for r in runs.values() if r is not killed[0]][0]
    for name in ("best/accuracy", "best/loss"):
        assert killed[0].data.metrics[name] == pytest.approx(reference.data.metrics[name], abs=1e-6)
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(killed[0].info.run_id, "eval/accuracy")]
    assert steps == sorted(set(steps)) and steps[-1] == 40


@pytest.mark.no_store
def test_unwritable_output_dir_is_reported_before_training(tiny_checkpoints, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_checkpoints["bert"], output_dir=str(blocked / "out")))
    done = subprocess.run([str(BIN / "finetune"), "run", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)
    assert done.returncode == 2
    assert "output_dir: cannot write to" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_server_going_away_does_not_kill_training(tiny_checkpoints, tmp_path):

    port = _free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/health", server, interval=0.5), "mlflow server did not start"
        deadline = time.time() + 120
        path = _recipe(tiny_checkpoints, tmp_path, "outage")
        # No client retries: what is tested is that training goes on, not how long the client retries.
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        run = subprocess.Popen([str(BIN / "finetune"), "run", str(path)], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
        while not (tmp_path / "outage" / "checkpoints" / "step-8").is_dir():
            assert run.poll() is None and time.time() < deadline + 300, run.stderr.read()[-3000:]
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # the tracking server dies mid-run
        server.wait(timeout=30)
        out, err = run.communicate(timeout=900)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert run.returncode == 3, err[-3000:]
    assert "cannot be reached" in err and "training goes on" in err
    assert "The trained model is on disk" in err
    assert (tmp_path / "outage" / "best" / "model.safetensors").is_file()
    unsent = (tmp_path / "outage" / "mlflow_unsent_metrics.jsonl").read_text().splitlines()
    assert any('"eval/accuracy"' in line for line in unsent)


@pytest.mark.no_store
def test_a_full_disk_is_reported_before_training(tiny_checkpoints, tmp_path, monkeypatch):
    import shutil as sh

    from finetune.training import train
    from finetune.config.recipe import Recipe, RecipeError

    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr("finetune.training.preflight.shutil.disk_usage", lambda path: usage._replace(free=1000))
    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], output_dir=str(tmp_path / "out")))
    with pytest.raises(RecipeError, match=r"output_dir: .* has 0.0 GiB free, but this run needs about"):
        train.main(recipe)
    assert not (tmp_path / "mlflow.db").exists()


def test_after_the_server_is_unreachable_calls_wait_instead_of_stalling_the_end_of_a_run():
    """Each try of an unreachable server costs the client's retries; after one, calls are skipped for 30 s (and
    reported), while an error the server answered with does not stop the next call."""
    import requests

    from finetune.tracking.tracker import Tracker

    tracker = Tracker.__new__(Tracker)  # the guard only, without starting an MLflow run
    tracker.failures, tracker._retry_after = [], 0.0
    tried = []

    def refused():
        tried.append("refused")
        try:
            raise requests.exceptions.ConnectionError("Connection refused")
        except requests.exceptions.ConnectionError:
            raise RuntimeError("API request to http://127.0.0.1:1/api failed")  # as MLflow wraps it

    def answered_with_an_error():
        tried.append("answered")
        raise ValueError("RESOURCE_DOES_NOT_EXIST")

    assert tracker.guarded("first", answered_with_an_error) is None
    assert tracker.guarded("second", answered_with_an_error) is None
    assert tracker.guarded("third", refused) is None
    assert tracker.guarded("fourth", refused) is None
    assert tried == ["answered", "answered", "refused"]
    assert tracker.failures[-1] == "fourth: not tried, MLflow could not be reached moments before"
    tracker._retry_after = 0.0  # 30 s later
    tracker.guarded("fifth", refused)
    assert tried[-1] == "refused" and len(tried) == 4
