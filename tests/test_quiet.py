"""Issue 34's noise: the terminal shows our lines (and one progress bar) only, in predict, export, evaluate,
label-issues and ui too; what the libraries print goes to a log, which --verbose shows."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.cli import main
from tests.conftest import DATA, first_rows, tiny_recipe, train_outside_test, write_recipe

BIN = Path(sys.executable).parent
# What the libraries print that must not reach the terminal (transformers' load report of an adapter's base, the
# bars of datasets and transformers, MLflow's and uvicorn's lines).
NOISE = ("LOAD REPORT", "MISSING", "newly initialized", "Consider training", "Map", "Loading weights",
         "Creating initial MLflow database tables", "INFO", "Uvicorn", "uvicorn", "\x1b[")


@contextlib.contextmanager
def transformers_warnings():
    """transformers at its default verbosity, as a user has it (the suite's default is error: it would hide the
    report the test looks for)."""
    import transformers.utils.logging as tl

    level = tl.get_verbosity()
    tl.set_verbosity_warning()
    try:
        yield
    finally:
        tl.set_verbosity(level)


@pytest.fixture(scope="module")
def adapter_model(tiny_checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quiet-adapter")
    recipe = tiny_recipe(tiny_checkpoints["bert"], output_dir=str(root / "lora"),
                         model={"checkpoint": str(tiny_checkpoints["bert"]), "max_length": 64, "adapter": {"r": 2}},
                         training={"max_steps": 2, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3,
                                   "logging_steps": 2},
                         tracking={"log_model": False, "system_metrics": False})
    return train_outside_test(root, recipe).best_dir


def test_loading_an_adapter_prints_no_missing_head_report(adapter_model, tmp_path, capfd):
    with transformers_warnings():
        capfd.readouterr()
        assert main(["predict", str(adapter_model), "a fine film"]) == 0
        shown = capfd.readouterr()
        assert main(["export", str(adapter_model), str(tmp_path / "onnx"), "--no-check"]) == 0
        exported = capfd.readouterr()
    assert re.search(r"(positive|negative)", shown.out)
    for phrase in ("LOAD REPORT", "MISSING", "newly initialized", "Consider training"):
        assert phrase not in shown.out + shown.err, shown.err
        assert phrase not in exported.out + exported.err, exported.err


def test_a_base_that_lacks_encoder_weights_is_still_an_error(adapter_model, tiny_checkpoints, tmp_path):
    """The report is silenced because the head is expected to be missing; missing encoder weights are not."""
    from safetensors.torch import load_file, save_file

    from finetune.errors import CheckpointError
    from finetune.models.adapters import load_adapter_model
    from finetune.models.modeling import read_model_info
    from finetune.tasks import get_task

    base = tmp_path / "base"
    base.mkdir()
    source = Path(tiny_checkpoints["bert"])
    for item in source.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (base / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(source / "model.safetensors"))
    dropped = [k for k in weights if "layer.0.attention.self.query" in k]
    assert dropped
    save_file({k: v.contiguous() for k, v in weights.items() if k not in dropped}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    info = read_model_info(adapter_model)
    adapter = dict(info.adapter)
    adapter["base"] = {**(adapter.get("base") or {}), "digest": None}
    with pytest.raises(CheckpointError, match="lacks .* encoder weights"):
        load_adapter_model(adapter_model, get_task(info.task), adapter, base_path=base)


def test_the_bar_is_not_drawn_again_below_the_last_evaluation_line(tmp_path):
    from finetune.cli import console

    screen = io.StringIO()
    with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen):
        with console.capture(tmp_path / "run.log"):
            report = console.TerminalReport()
            bar = report.progress(8, 0)
            bar.update(4)
            report.evaluated(4, "accuracy", {"accuracy": 0.5, "loss": 1.0}, 0.5, 4)
            bar.update(4)
            report.evaluated(8, "accuracy", {"accuracy": 0.75, "loss": 0.5}, 0.75, 8)
            bar.close()
    text = screen.getvalue()
    last = text.index("step 8: eval accuracy 0.7500")
    assert "training" not in text[last:], repr(text[last:])  # nothing of the bar after the final line
    assert "100%" in text[:last]  # drawn complete once, above it


def _evaluation_data(tmp_path: Path) -> Path:
    return first_rows(DATA / "sst2" / "dev.tsv", 40, tmp_path / "dev.tsv")


@pytest.fixture(scope="module")
def classifier(tiny_checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quiet-classifier")
    return train_outside_test(root, tiny_recipe(tiny_checkpoints["bert"], output_dir=str(root / "cls"), training={
        "max_steps": 2, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3, "logging_steps": 2},
        tracking={"log_model": False, "system_metrics": False})).best_dir


def test_evaluate_shows_our_lines_and_one_bar_and_keeps_the_rest_in_its_log(classifier, tmp_path, capfd):
    data = _evaluation_data(tmp_path)
    out_dir = tmp_path / "evaluation"
    with transformers_warnings():
        capfd.readouterr()
        assert main(["evaluate", str(classifier), str(data), "--quoting", "none", "--output-dir", str(out_dir)]) == 0
        shown = capfd.readouterr()
    for phrase in NOISE:
        assert phrase not in shown.out + shown.err, f"{phrase!r} reached the terminal:\n{shown.out}{shown.err}"
    assert "accuracy" in shown.out and f"files: {out_dir}" in shown.out
    assert shown.out.rstrip().splitlines()[-1] == f"log: {out_dir / 'evaluate.log'}"
    bars = {line.split(":")[0].strip() for line in re.split(r"[\r\n]", shown.err) if "%|" in line}
    assert bars <= {"evaluating"}, shown.err  # ours only (tqdm draws it on a terminal, not into a pipe)
    log = (out_dir / "evaluate.log").read_text()
    assert log.startswith("\n=====") and "accuracy" in log  # our lines too, with whatever the libraries said
    from finetune.training import outputs

    assert outputs.describe(out_dir).state == "evaluation + log"  # finetune's own files, the log included

    with transformers_warnings():
        assert main(["evaluate", str(classifier), str(data), "--quoting", "none", "--output-dir",
                     str(tmp_path / "again"), "--verbose"]) == 0
        loud = capfd.readouterr()
    assert "tokenising" in loud.err and "tokenising" not in shown.err  # datasets' bar: with --verbose only


def test_label_issues_shows_a_line_per_fold_and_one_bar(tiny_checkpoints, tmp_path, capfd):
    recipe = tiny_recipe(tiny_checkpoints["bert"], output_dir=str(tmp_path / "runs" / "li"),
                         data={"max_train_samples": 48},
                         training={"max_steps": 2, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3,
                                   "logging_steps": 2},
                         tracking={"log_model": False, "system_metrics": False})
    path = write_recipe(tmp_path / "li.yaml", recipe)
    out_dir = tmp_path / "issues"
    with transformers_warnings():
        capfd.readouterr()
        # An explicit --output-dir: the default one is where the folds train too (see the report of issue 34).
        assert main(["label-issues", str(path), "--folds", "2", "--output-dir", str(out_dir)]) == 0
        shown = capfd.readouterr()
    for phrase in NOISE:
        assert phrase not in shown.out + shown.err, f"{phrase!r} reached the terminal:\n{shown.out}{shown.err}"
    assert [line.split(":")[0] for line in shown.out.splitlines() if line.startswith("fold ")] == ["fold 1/2", "fold 2/2"]
    bars = {line.split(":")[0].strip() for line in re.split(r"[\r\n]", shown.err) if "%|" in line}
    assert bars == {"folds"}, shown.err
    assert shown.out.rstrip().splitlines()[-1] == f"log: {out_dir / 'label-issues.log'}"
    assert (out_dir / "label_issues.csv").is_file() and (out_dir / "label-issues.log").stat().st_size > 0


def test_ui_shows_our_lines_only_and_its_log_keeps_the_servers(tmp_path):
    from finetune.cli import ui

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([str(BIN / "finetune"), "ui", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first
        time.sleep(1)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("starting the MLflow UI for ") and lines[-1] == "stopped the MLflow UI", err
    assert [line for line in lines[1:-1] if not line.startswith("log: ")] == [], err
    for phrase in NOISE:
        assert phrase not in first + out + err
    with monkeypatched_cache(tmp_path / "cache"):
        log = Path(ui.ui_log()).read_text()
    assert log.strip(), "the server's own lines are in ui.log"


@contextlib.contextmanager
def monkeypatched_cache(folder: Path):
    saved = os.environ.get("FINETUNE_CACHE_DIR")
    os.environ["FINETUNE_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FINETUNE_CACHE_DIR", None)
        else:
            os.environ["FINETUNE_CACHE_DIR"] = saved
