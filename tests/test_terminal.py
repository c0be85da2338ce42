"""What `finetune run` shows a person: one screen of our own lines, the libraries' output in the run's log file."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from finetune.cli import main
from tests.conftest import DATA, tiny_recipe, write_recipe

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
BAR = re.compile(r"^training\s+\d+%\|")
# What the libraries printed on the terminal before (issue 15): each must now be in the log file only.
NOISE = ("Generating train split", "Casting the dataset", "Saving the dataset", "tokenising", "LOAD REPORT", "MISSING",
         "\x1b[", "Creating initial MLflow database tables", "UserWarning", "model card could not be retrieved",
         "license information", "system metrics", "# resolved recipe")


def _recipe(tmp_path: Path, checkpoint: Path, name: str, **sections) -> Path:
    sections = {"training": {"max_steps": 8, "eval_strategy": "steps", "eval_steps": 4, "logging_steps": 2},
                "tracking": {"experiment": "terminal", "log_model": True, "register_as": "tiny-terminal",
                             "system_metrics": True}} | sections
    recipe = tiny_recipe(checkpoint, name=name, output_dir=str(tmp_path / "runs" / name), **sections)
    return write_recipe(tmp_path / f"{name}.yaml", recipe, f"finetune run {name}.yaml")


def _runs(experiment: str) -> list:
    """The runs the CLI logged: it used MLFLOW_TRACKING_URI, whatever store an earlier test left mlflow pointing at."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def _lines(text: str) -> list[str]:
    return [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


@pytest.mark.no_store  # a first run: MLflow makes its tables, and that line must go to the log
def test_the_default_output_fits_one_screen_and_the_log_keeps_the_rest(tiny_checkpoints, tmp_path):
    path = _recipe(tmp_path, tiny_checkpoints["bert"], "screen")
    # Cold caches, as on a user's first run: the datasets library's messages are what the log must keep.
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # as a user has it: transformers reports the new head
    done = subprocess.run([str(BIN / "finetune"), "run", str(path), "training.learning_rate=2e-3"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = [line for line in _lines(done.stdout + "\n" + done.stderr) if not BAR.match(line)]
    assert len(shown) < 40, "\n".join(shown)
    for phrase in NOISE:
        assert phrase not in done.stdout + done.stderr, f"{phrase!r} reached the terminal:\n{done.stdout}{done.stderr}"
    assert any(BAR.match(line) for line in _lines(done.stderr)), "one live progress bar on stderr"

    out = _lines(done.stdout)
    assert out[0].startswith(f"recipe: {path} (screen: classification") and "training.learning_rate: 0.002" in out[0]
    assert f"checkpoint: {tiny_checkpoints['bert']} (bert, " in done.stdout and "from the folder" in done.stdout
    assert "head: new classifier for 2 labels, initialised at random: expected, fine-tuning trains it" in done.stdout
    assert "data: train 256, eval 64 from " in done.stdout and "device: cpu, " in done.stdout
    assert [line for line in out if line.startswith("step ")] == [line for line in out if re.match(r"step [48]: eval", line)]
    assert len([line for line in out if line.startswith("step ")]) == 2, "one line per evaluation"
    (run,) = _runs("terminal")
    run_dir = tmp_path / "runs" / "screen"
    assert out[-2] == f"model: {run_dir / 'best'}"
    assert out[-1] == f"MLflow: experiment {run.info.experiment_id}, run {run.info.run_id} in {os.environ['MLFLOW_TRACKING_URI']}"
    assert f"log: {run_dir / 'run.log'}" in out

    log = (run_dir / "run.log").read_text()
    for phrase in ("LOAD REPORT", "Creating initial MLflow database tables", "UserWarning", "Casting the dataset",
                   "model card could not be retrieved", "system metrics", "# resolved recipe", "learning_rate: 0.002"):
        assert phrase in log, f"{phrase!r} is not in the log"
    assert "\x1b[" not in log, "no colour codes in the log"
    assert "\r" not in log, "progress bars keep only their last state"
    assert "learning_rate: 0.002" in (run_dir / "recipe.yaml").read_text()


@pytest.mark.no_store  # a first run: MLflow makes its tables, and that line must go to the log
def test_verbose_shows_the_recipe_and_the_libraries(tiny_checkpoints, tmp_path, capsys):
    import transformers.utils.logging as tl

    path = _recipe(tmp_path, tiny_checkpoints["bert"], "loud", tracking={"experiment": "terminal", "log_model": False})
    library, root = logging.getLogger("transformers"), logging.getLogger()
    before = (library.handlers[:], library.propagate, root.handlers[:], root.level, sys.stdout, sys.stderr)
    level = tl.get_verbosity()
    tl.set_verbosity_warning()  # the test session's default is error
    try:
        assert main(["run", str(path), "--verbose", "training.max_steps=2"]) == 0
    finally:
        tl.set_verbosity(level)
    out = capsys.readouterr()
    assert "# resolved recipe" in out.out and "max_steps: 2" in out.out
    assert "LOAD REPORT" in out.err and "Creating initial MLflow database tables" in out.err
    assert "LOAD REPORT" in (tmp_path / "runs" / "loud" / "run.log").read_text()
    # Afterwards this process's logging and output streams are as they were.
    assert (library.handlers, library.propagate, root.handlers, root.level, sys.stdout, sys.stderr) == before


def test_a_run_whose_predictions_collapse_to_one_class_says_so(tiny_checkpoints, tmp_path, capsys):
    # Trained on negative sentences only, the model answers `negative` for everything.
    rows = (DATA / "sst2" / "train.tsv").read_text().splitlines()
    negatives = [rows[0]] + [r for r in rows[1:] if r.rsplit("\t", 1)[1] == "0"][:64]
    (tmp_path / "negatives.tsv").write_text("\n".join(negatives) + "\n")
    path = _recipe(tmp_path, tiny_checkpoints["bert"], "collapse",
                   data={"files": {"train": str(tmp_path / "negatives.tsv"), "validation": str(DATA / "sst2" / "dev.tsv")},
                         "max_train_samples": 64},
                   tracking={"experiment": "collapse", "log_model": False, "system_metrics": False})
    assert main(["run", str(path), "training.max_steps=4"]) == 0
    out = capsys.readouterr()
    assert "warning: the best model predicts 'negative' for all 64 evaluation examples" in out.err
    assert "too few steps" in out.err and "training.learning_rate" in out.err
    (run,) = _runs("collapse")
    assert "predicts 'negative' for all 64" in run.data.tags["finetune.warnings"]
    assert out.out.strip().splitlines()[-1].startswith("MLflow: experiment"), "the summary still ends where the run is"


def test_the_collapse_warning_is_the_classification_task_s():
    from finetune.tasks import Reference, TaskSettings, get_task

    task, settings = get_task("classification"), TaskSettings()
    gold = {"labels": [0, 1, 1, 0]}
    one_class = np.array([[0.1, 2.0]] * 4)
    assert task.evaluation_warnings(Reference(None, gold, None), one_class, ["neg", "pos"], settings)[0].startswith(
        "the best model predicts 'pos' for all 4 evaluation examples (50% of them are 'pos')")
    mixed = np.array([[0.1, 2.0], [2.0, 0.1], [0.1, 2.0], [0.1, 2.0]])
    assert task.evaluation_warnings(Reference(None, gold, None), mixed, ["neg", "pos"], settings) == []
    only_pos_gold = {"labels": [1, 1, 1, 1]}  # one gold class: answering it everywhere is right
    assert task.evaluation_warnings(Reference(None, only_pos_gold, None), one_class, ["neg", "pos"], settings) == []
    assert get_task("regression").evaluation_warnings(Reference(None, gold, None), one_class, None, settings) == []
