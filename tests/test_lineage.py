"""What a run records about what it came from, as numbers and run ids: a parent model given as a folder, the
distillation teacher, balanced class weights; layer-wise LR decay and the teacher in the run header."""

from __future__ import annotations

import json

import mlflow
import pytest

from finetune.config.recipe import Recipe
from finetune.training import outputs, train
from finetune.training.report import RunReport
from finetune.training.start import folder_run_id
from tests.conftest import tiny_recipe

TRACKED = {"log_model": False, "system_metrics": False}


class _Header(RunReport):
    def training_starts(self, start):
        self.start = start


@pytest.fixture
def parent(tiny_checkpoints, tmp_path):
    """A fine-tuned tiny model in runs/parent/best, trained in this test's store."""
    return train.main(Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], name="parent", output_dir="runs/parent", tracking=TRACKED,
        training={"max_steps": 2, "batch_size": 8})))


def test_a_parent_given_as_a_folder_records_its_run_id_and_its_path(parent, tiny_checkpoints, tmp_path):
    header = _Header()
    child = train.main(Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], name="child", output_dir="runs/child", tracking=TRACKED,
        model={"checkpoint": "runs/parent/best"},
        task={"type": "classification", "class_weights": "balanced"},
        training={"max_steps": 2, "batch_size": 8, "layer_lr_decay": 0.9})), report=header)
    run = mlflow.get_run(child.run_id).data
    assert run.tags["finetune.parent_run_id"] == parent.run_id
    assert run.tags["finetune.parent_model"] == str((tmp_path / "runs/parent/best").resolve())
    saved = json.loads((child.best_dir / "finetune.json").read_text())
    assert saved["parent"]["run_id"] == parent.run_id
    # class_weights: balanced is recorded as the numbers it became, per label
    weights = json.loads(run.params["task.class_weights.resolved"])
    assert weights == dict(zip(["negative", "positive"], saved["settings"]["class_weights"]))
    assert all(isinstance(w, float) and w > 0 for w in weights.values()) and len(set(weights.values())) == 2
    assert run.params["task.class_weights"] == "balanced"
    decay = [n for n in header.start.notes if n.startswith("Layer-wise learning-rate decay 0.9")]
    assert decay and "top of 2 encoder layers trains at 0.001" in decay[0] and "embeddings at 0.00081" in decay[0]


def test_a_best_folder_names_only_the_run_that_wrote_it(parent, tiny_checkpoints, tmp_path):
    """A rerun that failed before its first evaluation marks the output folder with its own run, though best/ is still
    the earlier run's: the marker's run is checked against the run's logged evaluation loss."""
    best = tmp_path / "runs/parent/best"
    assert folder_run_id(best, json.loads((best / "finetune.json").read_text())["metrics"]) == parent.run_id
    other = train.main(Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], name="other", output_dir="runs/other", tracking=TRACKED,
        training={"max_steps": 2, "batch_size": 8, "seed": 7})))
    outputs.update_marker(tmp_path / "runs/parent", mlflow_run_id=other.run_id, state="failed")
    metrics = json.loads((best / "finetune.json").read_text())["metrics"]
    assert folder_run_id(best, metrics) is None
    outputs.update_marker(tmp_path / "runs/parent", mlflow_run_id="0" * 32, state="failed")
    assert folder_run_id(best, metrics) is None, "a run the store does not know, in a folder that did not finish"
    outputs.update_marker(tmp_path / "runs/parent", mlflow_run_id=parent.run_id, state="finished")
    assert folder_run_id(best, metrics) == parent.run_id


def test_a_downloaded_mlflow_model_folder_names_its_run(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text(f"artifact_path: model\nrun_id: {'ab' * 16}\nflavors: {{}}\n")
    assert folder_run_id(folder) == "ab" * 16
    (folder / "MLmodel").write_text("run_id: not-an-id\n")
    assert folder_run_id(folder) is None
    assert folder_run_id(tmp_path / "nothing-here") is None


def test_the_teacher_is_recorded_by_absolute_path_and_run_id_and_shown_in_the_header(parent, tiny_checkpoints, tmp_path):
    header = _Header()
    student = train.main(Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], name="student", output_dir="runs/student", tracking=TRACKED,
        data={"max_train_samples": 64}, training={"max_steps": 2, "batch_size": 8},
        distillation={"teacher": "runs/parent/best", "temperature": 2.0, "alpha": 0.5})), report=header)
    tags = mlflow.get_run(student.run_id).data.tags
    teacher = str((tmp_path / "runs/parent/best").resolve())
    assert tags["finetune.teacher"] == teacher and tags["finetune.teacher_run_id"] == parent.run_id
    assert tags["finetune.teacher_precision"] in ("fp32", "bf16")
    assert mlflow.get_run(student.run_id).data.params["distillation.teacher_precision.resolved"] == \
        tags["finetune.teacher_precision"]
    said = [n for n in header.start.notes if n.startswith("Distilled from ")]
    assert said == [f"Distilled from {teacher} (MLflow run {parent.run_id}): temperature 2, alpha 0.5; teacher outputs "
                    f"computed in {tags['finetune.teacher_precision']}."]


def test_a_teacher_named_by_run_id_or_alias_records_the_run_and_the_version(parent, tmp_path):
    from finetune.training.teacher import teacher_lineage

    def lineage(teacher: str) -> dict:
        return teacher_lineage(Recipe.model_validate(tiny_recipe("x", distillation={"teacher": teacher})))

    assert lineage(parent.run_id)["finetune.teacher_run_id"] == parent.run_id
    assert lineage(f"runs:/{parent.run_id}/model")["finetune.teacher_run_id"] == parent.run_id
    client = mlflow.MlflowClient()
    client.create_registered_model("teacher-model")
    version = client.create_model_version("teacher-model", "runs:/x/model", run_id=parent.run_id)
    client.set_registered_model_alias("teacher-model", "champion", version.version)
    found = lineage("models:/teacher-model@champion")
    assert found["finetune.teacher"] == f"models:/teacher-model/{version.version}"
    assert found["finetune.teacher_run_id"] == parent.run_id
