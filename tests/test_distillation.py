"""Distillation: the loss is the formula, alpha 0 is the task loss, teacher outputs are computed once and equal fresh
ones, and a distilled student is a model like any other (served, exported, its card and run naming the teacher)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from finetune.config.recipe import Recipe
from finetune.errors import RecipeError
from finetune.tasks import TaskSettings, get_task
from finetune.tasks.distillation import TEACHER_HIDDEN, TEACHER_LOGITS, DistilledTask
from finetune.training import train
from tests.conftest import tiny_recipe, train_outside_test


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


# A hand-built batch: 3 examples, 4 classes (or labels).
STUDENT = np.array([[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.0, 0.0], [-2.0, 1.5, 0.5, 0.7]])
TEACHER = np.array([[2.0, -1.0, 0.0, 1.0], [0.0, 0.5, -0.5, 0.3], [-1.0, 2.5, 0.1, 0.2]])


def test_classification_loss_is_the_formula():
    labels = np.array([3, 1, 1])
    task = DistilledTask(get_task("classification"), temperature=2.0, alpha=0.7)
    got = task.loss(SimpleNamespace(logits=torch.tensor(STUDENT)),
                    {"labels": torch.tensor(labels), TEACHER_LOGITS: torch.tensor(TEACHER)}, TaskSettings())
    T = 2.0
    ce = -np.mean(np.log(_softmax(STUDENT)[np.arange(3), labels]))
    p, q = _softmax(TEACHER / T), _softmax(STUDENT / T)
    kl = np.sum(p * (np.log(p) - np.log(q))) / 3
    assert got.item() == pytest.approx(0.3 * ce + 0.7 * T * T * kl, rel=1e-5)


def test_multi_label_and_regression_losses_are_the_formula():
    labels = np.array([[1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 1, 1]], dtype=np.float32)
    task = DistilledTask(get_task("multi_label"), temperature=3.0, alpha=0.4)
    got = task.loss(SimpleNamespace(logits=torch.tensor(STUDENT)),
                    {"labels": torch.tensor(labels), TEACHER_LOGITS: torch.tensor(TEACHER)}, TaskSettings())
    T = 3.0
    s = _sigmoid(STUDENT)
    bce = -np.mean(labels * np.log(s) + (1 - labels) * np.log(1 - s))
    p, q = _sigmoid(TEACHER / T), _sigmoid(STUDENT / T)
    kl = np.mean(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)))
    assert got.item() == pytest.approx(0.6 * bce + 0.4 * T * T * kl, rel=1e-5)

    gold = np.array([0.5, 1.0, -0.2])
    task = DistilledTask(get_task("regression"), temperature=5.0, alpha=0.25)
    got = task.loss(SimpleNamespace(logits=torch.tensor(STUDENT[:, :1])),
                    {"labels": torch.tensor(gold), TEACHER_LOGITS: torch.tensor(TEACHER[:, :1])}, TaskSettings())
    mse_gold = np.mean((STUDENT[:, 0] - gold) ** 2)
    mse_teacher = np.mean((STUDENT[:, 0] - TEACHER[:, 0]) ** 2)  # the temperature does not enter
    assert got.item() == pytest.approx(0.75 * mse_gold + 0.25 * mse_teacher, rel=1e-5)


def test_hidden_state_matching_adds_the_first_tokens_squared_difference():
    hidden = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    task = DistilledTask(get_task("classification"), temperature=1.0, alpha=0.0, hidden_weight=0.5)
    outputs = SimpleNamespace(logits=torch.tensor(STUDENT), hidden_states=(hidden * 0, hidden))
    targets = {"labels": torch.tensor([0, 1, 2]), TEACHER_LOGITS: torch.tensor(TEACHER), TEACHER_HIDDEN: target}
    plain = get_task("classification").loss(outputs, {"labels": targets["labels"]}, TaskSettings())
    got = task.loss(outputs, targets, TaskSettings())
    assert got.item() == pytest.approx(plain.item() + 0.5 * ((hidden[:, 0] - target) ** 2).mean().item(), rel=1e-5)
    inputs, split = task.split_batch({"input_ids": 1, **targets})
    assert inputs == {"input_ids": 1, "output_hidden_states": True} and set(split) == set(targets)


def test_with_alpha_zero_it_is_the_task_loss_and_evaluation_batches_get_the_task_loss():
    base = get_task("classification")
    outputs = SimpleNamespace(logits=torch.tensor(STUDENT))
    labels = torch.tensor([3, 1, 1])
    plain = base.loss(outputs, {"labels": labels}, TaskSettings())
    mixed = DistilledTask(base, temperature=4.0, alpha=0.0).loss(
        outputs, {"labels": labels, TEACHER_LOGITS: torch.tensor(TEACHER)}, TaskSettings())
    assert torch.equal(mixed, plain)
    # Without teacher outputs in the batch (evaluation) it is the task's loss whatever alpha is.
    assert torch.equal(DistilledTask(base, 2.0, 1.0).loss(outputs, {"labels": labels}, TaskSettings()), plain)


@pytest.fixture(scope="module")
def teacher_dir(tiny_checkpoints, tmp_path_factory):
    """A tiny classifier fine-tuned a little: the teacher."""
    root = tmp_path_factory.mktemp("teacher")
    return train_outside_test(root, tiny_recipe(
        tiny_checkpoints["bert"], output_dir=str(root / "run"), training={"max_steps": 10},
        tracking={"log_model": False, "system_metrics": False, "experiment": "teacher"})).best_dir


def student_recipe(checkpoint, teacher, tmp_path, **distillation) -> Recipe:
    return Recipe.model_validate(tiny_recipe(
        checkpoint, output_dir=str(tmp_path / "student"), data={"max_train_samples": 96},
        distillation={"teacher": str(teacher), "temperature": 2.0, "alpha": 0.5, **distillation},
        tracking={"log_model": True, "system_metrics": False, "experiment": "student"}))


def test_teacher_outputs_are_computed_once_and_equal_fresh_ones(teacher_dir, tiny_checkpoints, tmp_path, capsys):
    from finetune.data.features import prepare
    from finetune.models.modeling import load_tokenizer
    from finetune.models.predictor import Predictor
    from finetune.training.teacher import add_teacher_outputs

    recipe = student_recipe(tiny_checkpoints["distilbert"], teacher_dir, tmp_path, hidden_weight=1.0,
                            teacher_precision="fp32")
    task = get_task("classification")

    def prepared(recipe):
        return add_teacher_outputs(prepare(recipe, task, load_tokenizer(recipe.model.checkpoint)), recipe, 32)

    first = prepared(recipe)
    assert "(fp32) on 96 training examples: computed once, cached" in capsys.readouterr().out
    again = prepared(recipe)
    assert "from cache" in capsys.readouterr().out
    cached = np.array(again.train[TEACHER_LOGITS])
    assert np.array_equal(cached, np.array(first.train[TEACHER_LOGITS]))
    # The same numbers the teacher gives when asked now, text by text (fp32; batching only rounds).
    texts = list(first.raw_train["sentence"])
    fresh = Predictor.from_dir(teacher_dir).logits(texts, None)
    np.testing.assert_allclose(cached, fresh, rtol=0, atol=1e-5)
    assert np.array(first.train[TEACHER_HIDDEN]).shape == (len(first.train), 32)

    # In bf16 they are cached apart (never mixed up with the fp32 ones) and near the teacher's bf16 answers.
    bf16 = prepared(student_recipe(tiny_checkpoints["distilbert"], teacher_dir, tmp_path, hidden_weight=1.0,
                                   teacher_precision="bf16"))
    assert "(bf16) on 96 training examples: computed once, cached" in capsys.readouterr().out
    half = np.array(bf16.train[TEACHER_LOGITS])
    assert not np.array_equal(half, cached), "bf16 autocast did not run"
    spread = np.abs(cached).max()
    assert np.abs(half - cached).max() <= 0.05 * spread  # bf16 keeps three significant digits, not rounding
    assert np.abs(half - Predictor.from_dir(teacher_dir, precision="bf16").logits(texts, None)).max() <= 0.05 * spread


def test_teacher_precision_follows_the_students_by_default(teacher_dir, tiny_checkpoints, tmp_path, monkeypatch):
    from finetune.training import preflight
    from finetune.training.teacher import teacher_precision

    monkeypatch.setattr(preflight, "cpu_computes_bf16", lambda: True)
    for speedup, expected in ((1.5, "bf16"), (0.6, "fp32")):
        monkeypatch.setattr(preflight, "cpu_bf16_speedup", lambda: speedup)
        assert teacher_precision(student_recipe(tiny_checkpoints["bert"], teacher_dir, tmp_path)) == (
            expected if not torch.cuda.is_available() else "fp32")
    assert teacher_precision(student_recipe(tiny_checkpoints["bert"], teacher_dir, tmp_path,
                                            teacher_precision="fp32")) == "fp32"
    with pytest.raises(ValueError, match="teacher_precision"):
        student_recipe(tiny_checkpoints["bert"], teacher_dir, tmp_path, teacher_precision="fp16")


def test_a_distilled_student_trains_serves_and_exports_and_names_its_teacher(teacher_dir, tiny_checkpoints, tmp_path):
    from fastapi.testclient import TestClient

    from finetune.export.onnx import export_onnx
    from finetune.models.predictor import Predictor
    from serving.app import create_app
    from serving.loading import LoadedModel

    result = train.main(student_recipe(tiny_checkpoints["distilbert"], teacher_dir, tmp_path))
    assert math.isfinite(result.best_metrics["loss"])
    run = mlflow.get_run(result.run_id)
    assert run.data.tags["finetune.teacher"] == str(teacher_dir)
    assert run.data.tags["finetune.teacher_precision"] in ("fp32", "bf16")
    assert run.data.params["distillation.teacher"] == str(teacher_dir)
    assert f"**Distilled from:** `{teacher_dir}`" in (result.best_dir / "MODEL_CARD.md").read_text()
    assert json.loads((result.best_dir / "finetune.json").read_text())["task"] == "classification"

    student = Predictor.from_dir(result.best_dir)
    expected = student.predict(["a gripping, beautiful film"])
    loaded = LoadedModel(student, "student", None, result.run_id, str(result.best_dir))
    with TestClient(create_app(loaded), base_url="http://127.0.0.1") as client:
        answer = client.post("/v1/predict", json={"inputs": ["a gripping, beautiful film"]}).json()["predictions"]
    assert answer[0]["label"] == expected[0]["label"]
    report = export_onnx(result.best_dir, tmp_path / "onnx")  # checked on the recipe's evaluation data
    assert report["onnx_fp32_agreement"] == 1.0 and report["onnx_fp32"] == pytest.approx(report["pytorch"])


def test_teachers_that_do_not_fit_are_refused(teacher_dir, tiny_checkpoints, tmp_path):
    with pytest.raises(RecipeError, match=r"distillation.teacher: .* has the labels \['negative', 'positive'\], this "
                                          r"recipe \['bad', 'good'\]"):
        train.main(Recipe.model_validate({**student_recipe(tiny_checkpoints["bert"], teacher_dir, tmp_path).model_dump(),
                                          "data": {**tiny_recipe(tiny_checkpoints["bert"])["data"],
                                                   "label_names": ["bad", "good"]}}))
    with pytest.raises(RecipeError, match="distillation.hidden_weight: the teacher's hidden size is 32, the student's 48"):
        from finetune.training.teacher import check_teacher, load_teacher

        recipe = student_recipe(tiny_checkpoints["bert"], teacher_dir, tmp_path, hidden_weight=1.0)
        check_teacher(load_teacher(str(teacher_dir))[0], recipe, ["negative", "positive"], 48)
    with pytest.raises(RecipeError, match="distillation.teacher: model 'nowhere': there is no such folder, and it is not an MLflow run id"):
        load_teacher("nowhere")


def test_distillation_is_refused_where_it_means_nothing(tiny_checkpoints):
    teacher = {"teacher": "runs/t/best"}
    with pytest.raises(ValueError, match="distillation is for classification, multi_label and regression recipes, "
                                         "not task.type token_classification"):
        Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], "token_classification", distillation=teacher))
    with pytest.raises(ValueError, match="distillation cannot be used with task.long_inputs: chunk"):
        Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], task={"type": "classification", "long_inputs": "chunk", "chunk_stride": 16},
                                          distillation=teacher))
    with pytest.raises(ValueError, match="distillation.alpha"):
        Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], distillation={**teacher, "alpha": 1.5}))


def test_validate_checks_the_teacher(teacher_dir, tiny_checkpoints, tmp_path, capsys):
    from finetune.cli import main as cli
    from tests.conftest import write_recipe

    good = student_recipe(tiny_checkpoints["bert"], teacher_dir, tmp_path).model_dump(mode="json")
    assert cli(["validate", str(write_recipe(tmp_path / "good.yaml", good))]) == 0
    assert f"teacher: {teacher_dir} (classification, 2 layers)" in capsys.readouterr().out
    bad = {**good, "data": {**good["data"], "label_names": ["bad", "good"]}}
    assert cli(["validate", str(write_recipe(tmp_path / "bad.yaml", bad))]) == 1
    assert "distillation.teacher: " in capsys.readouterr().out
    # A checkpoint validate cannot read is reported once, and the teacher is still checked.
    unreadable = {**bad, "model": {**bad["model"], "checkpoint": str(tmp_path / "no-such-checkpoint")}}
    assert cli(["validate", str(write_recipe(tmp_path / "unreadable.yaml", unreadable))]) == 1
    out = capsys.readouterr().out
    assert "2 problem(s):" in out and out.count("  - model.checkpoint: ") == 1, out
    assert "  - distillation.teacher: " in out and "this recipe ['bad', 'good']" in out, out
