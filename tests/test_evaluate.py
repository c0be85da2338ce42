"""`finetune evaluate`: any model on any labelled data, through the task definition, logged as a linked MLflow run.

Each task family is trained for a few steps; evaluating the model on its recipe's evaluation split must give
the training run's numbers, and the `evaluate` modules finetune ships must give them too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from finetune.cli import main
from finetune.errors import DataError, EvaluationError
from finetune.evaluation.data import data_section, read_labelled
from finetune.evaluation.evaluate import run_evaluation
from finetune.evaluation.extra_metrics import ExtraMetrics, parse_spec
from finetune.tracking.sources import load_predictor, locate
from tests.conftest import DATA, FLOAT32_BATCH_RTOL, first_rows, tiny_recipe, train_outside_test, write_recipe

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
FAMILIES = {"classification": "bert", "regression": "bert", "multi_label": "bert", "token_classification": "bert",
            "question_answering": "distilbert", "multiple_choice": "bert"}


@pytest.fixture(scope="module")
def trained(tiny_checkpoints, tmp_path_factory):
    """Each family's tiny recipe trained a few steps; classification logs and registers its model and computes
    the packaged classification module as an extra metric at every evaluation."""
    root = tmp_path_factory.mktemp("evaluate")
    out = {"root": root, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    for kind, family in FAMILIES.items():
        sections = {"output_dir": str(root / kind), "tracking": {"log_model": False, "system_metrics": False}}
        if kind == "classification":
            sections["tracking"] = {"log_model": True, "system_metrics": False, "register_as": "tiny-eval"}
            sections["task"] = {"type": "classification", "extra_metrics": ["finetune:classification"]}
            sections["training"] = {"max_steps": 6, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3,
                                    "logging_steps": 2, "eval_strategy": "steps", "eval_steps": 3}
        recipe = tiny_recipe(tiny_checkpoints[family], kind, **sections)
        out[kind] = (train_outside_test(root, recipe), write_recipe(root / f"{kind}.yaml", recipe))
    return out


@pytest.fixture
def store(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["tracking_uri"])
    mlflow.set_tracking_uri(trained["tracking_uri"])
    return trained


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_evaluating_on_the_recipe_split_gives_the_training_runs_metrics(store, kind, tmp_path):
    result, recipe_path = store[kind]
    from finetune.config.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    found = locate(str(result.best_dir))
    predictor = load_predictor(found)
    labelled = read_labelled(data_section(None, recipe, {}, {}), recipe.data.eval_split, predictor.task,
                             predictor.info.label_names, recipe=recipe)
    packaged = ExtraMetrics([f"finetune:{kind}"], predictor.task)
    report = run_evaluation(found, predictor, labelled, tmp_path / "out", packaged, log=False, progress=False)
    trained_metrics = {k: v for k, v in result.best_metrics.items() if k != "loss" and "/" not in k}
    assert trained_metrics
    predictions = pd.read_csv(tmp_path / "out" / "evaluation" / "predictions.csv")
    assert len(predictions) == len(labelled.split)
    tolerances = {name: {"rel": FLOAT32_BATCH_RTOL, "abs": 1e-6} for name in trained_metrics}
    if kind == "regression":
        # A correlation reads the predictions standardised: rounding that moves each by FLOAT32_BATCH_RTOL of its size
        # moves it by that times size / spread there, and a tiny random model's predictions are nearly constant (size
        # / spread ~1,600 here: the correlation moved by 1e-4 of itself on a Zen 4). Independent roundings add up as
        # a random walk over the n predictions, so the bound is that over sqrt(n); it is taken from the predictions,
        # not from the metric's own size, and not tuned on one CPU.
        predicted = predictions["predicted"].to_numpy(dtype=float)
        conditioning = np.abs(predicted).max() / max(float(predicted.std()), 1e-12)
        for name in ("pearson", "spearman"):
            tolerances[name] = {"abs": max(1e-6, FLOAT32_BATCH_RTOL * conditioning / np.sqrt(len(predicted)))}
    for name, value in trained_metrics.items():
        # Same model and examples; the batches (and the threads, which follow the machine's load) may differ, so
        # float32 rounding may too: the suite's float32 tolerance, never one tuned on one CPU.
        assert report.metrics[name] == pytest.approx(value, **tolerances[name]), (kind, name)
        # The packaged `evaluate` module, loaded by path with no network, gives the same number.
        assert report.metrics[f"{kind}/{name}"] == pytest.approx(report.metrics[name], abs=1e-12), (kind, name)
    summary = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert summary["task"] == kind and summary["data"]["examples"] == len(labelled.split)


def test_recipe_extra_metrics_are_logged_at_every_evaluation(store):
    result, _ = store["classification"]
    client = mlflow.MlflowClient()
    own = {m.step: m.value for m in client.get_metric_history(result.run_id, "eval/accuracy")}
    extra = {m.step: m.value for m in client.get_metric_history(result.run_id, "eval/classification/accuracy")}
    assert sorted(own) == [3, 6] and extra == own
    assert client.get_run(result.run_id).data.metrics["best/classification/f1_macro"] == \
        pytest.approx(result.best_metrics["f1_macro"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = BIN / "finetune"
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "finetune", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ.copy())


def test_cli_logs_an_evaluation_run_linked_to_the_model_and_compare_shows_it(store, tmp_path, capsys):
    result, _ = store["classification"]
    dev = first_rows(DATA / "sst2" / "dev.tsv", 64, tmp_path / "dev64.tsv")  # the 64 rows training evaluated on
    done = _cli("evaluate", "models:/tiny-eval@champion", str(dev), "--quoting", "none", "--output-dir", "out",
                "--find-label-issues", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "per class metrics:" in done.stdout and "| negative |" in done.stdout and "label issues:" in done.stdout

    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                                filter_string="tags.`finetune.evaluation` = 'true'")
    tags = run.data.tags
    assert tags["finetune.model_run_id"] == result.run_id and tags["mlflow.parentRunId"] == result.run_id
    assert tags["finetune.model_name"] == "tiny-eval" and tags["finetune.model_version"] == "1"
    assert tags["finetune.eval_data"] == "dev64.tsv"
    assert run.data.metrics["accuracy"] == pytest.approx(result.best_metrics["accuracy"])
    assert run.data.metrics["examples"] == 64
    (data_input,) = run.inputs.dataset_inputs
    assert data_input.dataset.name == "dev64.tsv" and data_input.dataset.digest
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/predictions.csv", "evaluation/confusion_matrix.png", "evaluation/per_class_metrics.csv"} <= artifacts
    predictions = pd.read_csv(client.download_artifacts(run.info.run_id, "evaluation/predictions.csv", str(tmp_path)))
    assert not predictions["correct"].iloc[0] or predictions["correct"].all()  # mistakes first
    issues = pd.read_csv(tmp_path / "out" / "label_issues.csv")
    assert list(issues.columns[:4]) == ["row", "sentence", "given_label", "suggested_label"]

    capsys.readouterr()
    assert main(["compare", "--format", "json"]) == 0  # in this process: the CLI ran as a user's above
    rows = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert run.info.run_id not in rows  # an evaluation is not a training run
    assert rows[result.run_id]["accuracy @ dev64.tsv"] == pytest.approx(round(result.best_metrics["accuracy"], 4))
    assert main(["compare", "--evaluations", "--format", "json"]) == 0
    (row,) = [r for r in json.loads(capsys.readouterr().out) if r["evaluation_run_id"] == run.info.run_id]
    assert row["model"] == "tiny-eval v1" and row["data"] == "dev64.tsv" and row["metric"] == "accuracy"


def test_labels_the_model_never_saw_are_counted_and_named(store, tmp_path, capsys):
    result, _ = store["classification"]
    rows = ["sentence\tlabel", "a fine film\tpositive", "dull\tnegative", "meh\tneutral", "so so\tneutral",
            "odd\tmixed", "great fun\t1"]
    path = tmp_path / "odd.tsv"
    path.write_text("\n".join(rows) + "\n")
    assert main(["evaluate", str(result.best_dir), str(path), "--no-log"]) == 2
    message = capsys.readouterr().err
    assert "3 of 6 rows" in message and "'neutral' (2)" in message and "'mixed' (1)" in message, message
    assert "the model's labels: negative, positive" in message and "--skip-unknown-labels" in message

    assert main(["evaluate", str(result.best_dir), str(path), "--no-log", "--skip-unknown-labels",
                 "--output-dir", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "left out 3 rows with labels the model never saw: 'neutral' (2), 'mixed' (1)" in captured.err
    summary = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert summary["data"]["examples"] == 3 and summary["data"]["unknown_labels"] == {"neutral": 2, "mixed": 1}


def test_missing_columns_and_bad_metrics_get_a_message(store, tmp_path, capsys):
    result, _ = store["classification"]
    path = tmp_path / "other.csv"
    path.write_text("review,label\nnice,positive\n")
    assert main(["evaluate", str(result.best_dir), str(path), "--no-log"]) == 2
    message = capsys.readouterr().err
    assert "--text-column (data.text_column): column 'sentence' is not in 'evaluation'" in message
    assert "columns found: review, label" in message
    assert main(["evaluate", str(result.best_dir), str(path), "--no-log", "--text-column", "review"]) == 0
    capsys.readouterr()
    # A hub data set (offline here): the loader's message, naming the data set and what to do instead.
    assert main(["evaluate", str(result.best_dir), "glue", "--dataset-config", "sst2", "--split", "validation",
                 "--no-log"]) == 2
    assert "data.dataset: cannot load 'glue' (config 'sst2')" in capsys.readouterr().err
    # A hub metric name cannot be fetched offline: one message that says to pass a path (with the opt-in to run
    # metric scripts; without it they are refused first, tests/test_metric_code.py).
    with pytest.raises(EvaluationError, match="pass the path of a local metric module"):
        ExtraMetrics(["accuracy"], allow_code=True)
    with pytest.raises(EvaluationError, match="there is no metric module at"):
        ExtraMetrics([str(tmp_path / "nowhere" / "mine")], allow_code=True)
    with pytest.raises(EvaluationError, match="task.allow_metric_code: true"):
        ExtraMetrics(["accuracy"])


def test_metric_specs_parse_with_config_and_arguments():
    spec = parse_spec("f1, config=multilabel, average=macro")
    assert (spec.name, spec.config, spec.args, spec.label) == ("f1", "multilabel", {"average": "macro"}, "f1_multilabel_macro")
    assert parse_spec("finetune:regression").label == "regression"
    with pytest.raises(EvaluationError, match="is not KEY=VALUE"):
        parse_spec("f1,macro")


PACKAGED_CASES = {
    "classification": lambda rng: (rng.integers(0, 3, 40), rng.integers(0, 3, 40)),
    "multi_label": lambda rng: (rng.integers(0, 2, (40, 4)), rng.integers(0, 2, (40, 4))),
    "regression": lambda rng: (rng.normal(size=40), rng.normal(size=40)),
    "multiple_choice": lambda rng: (rng.integers(0, 4, 40), rng.integers(0, 4, 40)),
}


def test_packaged_modules_load_offline_and_equal_the_internal_metrics():
    import finetune.tasks.metrics as M
    from finetune.evaluation.extra_metrics import MODULES_DIR

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    shipped = sorted(p.name for p in MODULES_DIR.iterdir() if (p / f"{p.name}.py").is_file())
    assert shipped == sorted(FAMILIES)  # one per shipped task
    extra = ExtraMetrics([f"finetune:{name}" for name in shipped])
    modules = dict(zip(shipped, extra.modules))
    rng = np.random.default_rng(0)
    internal = {"classification": M.CLASSIFICATION, "multi_label": M.MULTI_LABEL, "regression": M.REGRESSION}
    for name, make in PACKAGED_CASES.items():
        gold, predicted = make(rng)
        got = modules[name].compute(predictions=predicted.tolist(), references=gold.tolist())
        want = M.compute_all(internal[name], gold, predicted) if name in internal else {"accuracy": M.accuracy(gold, predicted)}
        assert got == want, name
    tags = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"]]
    guessed = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
    assert modules["token_classification"].compute(predictions=guessed, references=tags) == M.entity_scores(tags, guessed)
    answers = [["Paris", "in Paris"], ["1889"]]
    got = modules["question_answering"].compute(
        predictions=[{"id": "a", "prediction_text": "Paris"}, {"id": "b", "prediction_text": "in 1889"}],
        references=[{"id": "a", "answers": {"text": answers[0], "answer_start": [3, 0]}},
                    {"id": "b", "answers": {"text": answers[1], "answer_start": [5]}}])
    assert got == M.squad_scores(["Paris", "in 1889"], answers)


def test_unknown_label_reading_keeps_rows_and_positions(tiny_checkpoints, tmp_path):
    """Integer labels are positions for a model with named labels, names for a model whose labels are integers."""
    from finetune.tasks import get_task

    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0\nb,1\nc,2\nd,5\n")
    data = data_section(str(path), None, {}, {})
    task = get_task("classification")
    named = read_labelled(data, "evaluation", task, ["negative", "positive"], skip_unknown=True)
    assert named.rows == [0, 1] and list(named.split["labels"]) == [0, 1] and named.unknown == {"2": 1, "5": 1}
    numbered = read_labelled(data, "evaluation", task, ["0", "2", "5"], skip_unknown=True)
    assert numbered.rows == [0, 2, 3] and list(numbered.split["labels"]) == [0, 1, 2] and numbered.unknown == {"1": 1}
    with pytest.raises(DataError, match="1 of 4 rows"):
        read_labelled(data, "evaluation", task, ["0", "2", "5"])
