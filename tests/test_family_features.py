"""Every family through the transfer toolbox, end to end on its tiny checkpoint: freezing layers with layer-wise
learning rates and head-only steps, a frozen encoder whose outputs are cached, LoRA with the family's default
targets, `model.pooling`, masked-LM pretraining and fine-tuning its output, a smaller student distilled from a
teacher, and the ONNX export. Each trained model must answer through the serving path with the metrics its run
logged (the frozen-feature cache once made the trained model differ from the saved one).

The cases come from tests/family_matrix.py (what the support matrix in docs/guides/model-families.md is generated from).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.config.recipe import Recipe
from finetune.data.loading import load_splits
from finetune.families import FAMILIES
from finetune.models.predictor import Predictor
from finetune.tasks import get_task
from tests.conftest import DATA, first_rows, tiny_recipe, train_outside_test
from tests.family_matrix import RECIPE_MODEL, families_for

pytestmark = pytest.mark.e2e


EXAMPLES = 32
"""Trained and evaluated on the same first SST-2 sentences: a tiny model fits them, so its answers differ by input and
a model that is not the trained one shows in the metrics."""


def run(checkpoint: Path | str, family: str, root: Path, name: str, kind: str = "classification", **sections) -> tuple:
    """Train a tiny recipe (its model section merged with what the family needs); (recipe, RunResult)."""
    model = {"checkpoint": str(checkpoint), "max_length": 64, **RECIPE_MODEL.get(family, {}), **sections.pop("model", {})}
    fitted = str(first_rows(DATA / "sst2" / "train.tsv", EXAMPLES, root / f"first-{EXAMPLES}.tsv"))
    data = {"files": {"train": fitted, "validation": fitted}, "max_train_samples": None, "max_eval_samples": None,
            **sections.pop("data", {})}
    training = {"max_steps": 16, "learning_rate": 5e-3, "warmup_ratio": 0.0, "scheduler": "constant",
                "eval_strategy": "steps", "eval_steps": 30, "logging_steps": 30, **sections.pop("training", {})}
    for attempt in (1, 3):  # until the predictions are not constant: three times the steps once more
        steps = training["max_steps"] * attempt
        recipe = tiny_recipe(Path(checkpoint), kind, output_dir=str(root / f"{name}-{steps}"), model=model,
                             training={**training, "max_steps": steps, "eval_steps": steps, "logging_steps": steps},
                             tracking={"log_model": False, "system_metrics": False, "experiment": family}, **sections)
        recipe["data"] = {**recipe["data"], **data}
        result = train_outside_test(root, recipe)
        if recipe["task"]["type"] != "classification" or result.best_metrics["recall_macro"] > 0.5:
            break
    return Recipe.model_validate(recipe), result


def served_metrics(recipe: Recipe, result) -> dict[str, float]:
    """The saved model's metrics on the run's evaluation split through the serving path (Predictor)."""
    task = get_task(recipe.task.type)
    _, _, evaluation, _ = load_splits(recipe, task)
    predictor = Predictor.from_dir(result.best_dir)
    logits = predictor.logits(evaluation[recipe.data.text_column], None)
    return task.compute_metrics(logits, np.asarray(evaluation["labels"]), recipe.task.threshold)


def assert_served_as_logged(recipe: Recipe, result) -> None:
    """The served metrics are the logged ones, and the model does not answer every input alike."""
    if recipe.task.type == "classification":
        assert result.best_metrics["recall_macro"] > 0.5, f"the model's predictions are constant: {result.best_metrics}"
    again = served_metrics(recipe, result)
    for name, value in result.best_metrics.items():
        if name != "loss":
            assert again[name] == pytest.approx(value, abs=1e-6), f"{name}: served {again[name]}, logged {value}"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def teachers(tiny_checkpoints, tmp_path_factory):
    """Per family: a classification model trained with the first layer frozen, layer-wise learning-rate decay and
    head-only steps (the teacher of the distillation test and the source of the ONNX export)."""
    root = tmp_path_factory.mktemp("features")
    out = {}
    for family in families_for("freeze"):
        out[family] = (root, *run(tiny_checkpoints[family], family, root, f"{family}-teacher",
                                  training={"freeze": 1, "layer_lr_decay": 0.8, "head_only_steps": 2,
                                            "learning_rate": 1e-2, "max_steps": 24}))
    return out


@pytest.mark.parametrize("family", families_for("freeze"))
def test_freezing_layer_wise_rates_and_head_only_steps(teachers, tiny_checkpoints, family):
    root, recipe, result = teachers[family]
    assert_served_as_logged(recipe, result)
    before, after = weights(tiny_checkpoints[family]), weights(result.best_dir)
    family_layer = FAMILIES[family]
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(result.best_dir)
    prefix = model.base_model_prefix + "."
    from finetune.models.layers import depths

    found, _ = depths(model)
    kept = [k for k, d in found.items() if d in (0, 1)]
    trained = [k for k, d in found.items() if d == 2]
    assert kept and trained, family_layer
    same = lambda k: torch.equal(before[k.removeprefix(prefix)], after[k])  # noqa: E731  (the checkpoint is a bare encoder)
    assert all(same(k) for k in kept), [k for k in kept if not same(k)]
    assert not all(same(k) for k in trained), "the unfrozen layer did not train"


@pytest.mark.parametrize("family", families_for("pooling"))
def test_a_frozen_encoder_is_cached_and_the_saved_model_is_the_trained_one(tiny_checkpoints, tmp_path, family):
    # EuroBERT's own pooling (late: the mean of every token's logits) reads every position; the others pool the mean
    # of the tokens, through their family's own setting (ModernBERT) or with the mean where the first token was.
    pooling = "auto" if family == "eurobert" else "mean"
    recipe, result = run(tiny_checkpoints[family], family, tmp_path, "frozen", model={"pooling": pooling},
                         training={"freeze": "encoder", "learning_rate": 2e-2, "max_steps": 24})
    card = (result.best_dir / "MODEL_CARD.md").read_text()
    assert "computed once per text and cached" in card
    assert_served_as_logged(recipe, result)
    config = json.loads((result.best_dir / "config.json").read_text())
    if pooling == "mean":
        key = FAMILIES[family].pooling_key
        assert (config[key] == "mean") if key else (config["finetune_pooling"] == "mean")
    # The ONNX graph reads what the head reads too.
    from finetune.export.onnx import OnnxPredictor, export_onnx

    export_onnx(result.best_dir, tmp_path / "onnx", check=False)
    _, _, evaluation, _ = load_splits(recipe, get_task("classification"))
    texts = evaluation[recipe.data.text_column]
    np.testing.assert_allclose(OnnxPredictor.from_dir(tmp_path / "onnx").logits(texts, None),
                               Predictor.from_dir(result.best_dir).logits(texts, None), atol=1e-4)


@pytest.mark.parametrize("family", families_for("lora"))
def test_lora_with_the_familys_default_targets(tiny_checkpoints, tmp_path, family):
    recipe, result = run(tiny_checkpoints[family], family, tmp_path, "lora",
                         model={"adapter": {"r": 4, "alpha": 8}, "pooling": "first"},
                         training={"learning_rate": 2e-2, "max_steps": 40})
    saved = json.loads((result.best_dir / "finetune.json").read_text())
    assert saved["adapter"]["target_modules"] == sorted(FAMILIES[family].lora_targets)
    assert (result.best_dir / "adapter_model.safetensors").is_file() and not (result.best_dir / "model.safetensors").exists()
    assert_served_as_logged(recipe, result)


@pytest.mark.parametrize("family", families_for("pretrain"))
def test_pretraining_and_fine_tuning_its_output_keeps_the_trained_head_parts(tiny_checkpoints, tmp_path, family):
    texts = str(first_rows(DATA / "sst2" / "train.tsv", 64, tmp_path / "texts.tsv"))
    pretrained, mlm = run(tiny_checkpoints[family], family, tmp_path, "mlm", kind="classification",
                          task={"type": "masked_lm"}, data={"files": {"train": texts}, "validation_size": 0.25},
                          training={"max_steps": 4, "eval_steps": 4})
    assert np.isfinite(mlm.best_metrics["perplexity"])
    recipe, result = run(mlm.best_dir, family, tmp_path, "from-mlm")
    saved = json.loads((result.best_dir / "finetune.json").read_text())
    assert saved["parent"]["task"] == "masked_lm"
    assert_served_as_logged(recipe, result)
    shared = FAMILIES[family].mlm_head_shared
    if shared:  # ModernBERT: the new head's dense + norm start as the pretrained masked-LM head's
        from finetune.models.pretrained import ResolvedCheckpoint
        from finetune.models.starting import full_model_start

        trained = {k: v for k, v in weights(mlm.best_dir).items() if k.startswith(shared)}
        assert trained
        start = full_model_start(ResolvedCheckpoint("mlm", mlm.best_dir, "local"), recipe.model, get_task("classification"),
                            ["negative", "positive"], False, "masked_lm")
        params = dict(start.model.named_parameters())
        assert all(torch.equal(params[k], v) for k, v in trained.items()), "the trained head parts were not kept"
        assert "pretrained masked-LM head's" in (result.best_dir / "MODEL_CARD.md").read_text()
    if FAMILIES[family].head_pooler and family != "roberta":  # BERT: the checkpoint's pooler went through pretraining
        pooler = [k for k in weights(mlm.best_dir) if ".pooler." in f".{k}"]
        assert pooler, "the pretrained pooler was not carried"


@pytest.mark.parametrize("family", families_for("fewer_layers"))
def test_a_student_of_fewer_layers_is_distilled_from_its_teacher(teachers, family):
    from finetune.models.layer_selection import select_layers

    root, teacher_recipe, teacher = teachers[family]
    student = root / f"{family}-student-checkpoint"
    report = select_layers(str(teacher.best_dir), student, [0])
    from transformers import AutoConfig

    assert report["layers_kept"] == [0] and AutoConfig.from_pretrained(student).num_hidden_layers == 1
    recipe, result = run(student, family, root, f"{family}-student",
                         distillation={"teacher": str(teacher.best_dir), "alpha": 0.5})
    assert_served_as_logged(recipe, result)


@pytest.mark.parametrize("family", families_for("onnx"))
def test_onnx_export_answers_as_pytorch(teachers, tmp_path, family):
    from finetune.errors import ExportError
    from finetune.export.onnx import OnnxPredictor, export_onnx

    _, recipe, teacher = teachers[family]
    try:
        report = export_onnx(teacher.best_dir, tmp_path / "onnx", quantize="int8")
    except ExportError as refused:  # int8 more than a point worse than fp32: refused with the figures, as users see
        assert "int8" in str(refused)
        report = export_onnx(teacher.best_dir, tmp_path / "onnx")
    assert report["onnx_fp32_agreement"] == 1.0, report
    _, _, evaluation, _ = load_splits(recipe, get_task("classification"))
    texts = evaluation[recipe.data.text_column][:16]
    np.testing.assert_allclose(OnnxPredictor.from_dir(tmp_path / "onnx").logits(texts, None),
                               Predictor.from_dir(teacher.best_dir).logits(texts, None), atol=1e-4)
