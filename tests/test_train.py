"""The training loop on tiny random checkpoints (every family and task end to end: tests/test_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.training import train
from finetune.models.predictor import Predictor
from finetune.config.recipe import Recipe
from tests.conftest import DATA, first_rows, tiny_recipe


def _run(recipe_dict: dict) -> tuple[Recipe, train.RunResult]:
    recipe = Recipe.model_validate(recipe_dict)
    return recipe, train.main(recipe)


def test_training_actually_learns(tiny_checkpoints, tmp_path):
    """A tiny model must fit a small training set it is then evaluated on (the loop really optimises)."""
    small = str(first_rows(DATA / "sst2" / "train.tsv", 48, tmp_path / "small.tsv"))
    recipe, result = _run(
        tiny_recipe(
            tiny_checkpoints["bert"],
            data={"files": {"train": small, "validation": small}, "max_train_samples": None, "max_eval_samples": None},
            training={"max_steps": None, "num_epochs": 12, "batch_size": 16, "learning_rate": 3e-3,
                      "warmup_ratio": 0.0, "scheduler": "constant", "logging_steps": 3},
        )
    )
    assert result.best_metrics["accuracy"] >= 0.9, f"a tiny model could not fit 48 examples: {result.best_metrics}"
    # The saved best model gives the same answers through the serving path.
    import csv

    with open(small, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    answers = Predictor.from_dir(result.best_dir).predict([r["sentence"] for r in rows])
    predicted = [recipe.data.label_names.index(a["label"]) for a in answers]
    accuracy = float(np.mean(np.asarray(predicted) == np.asarray([int(r["label"]) for r in rows])))
    assert accuracy == pytest.approx(result.best_metrics["accuracy"])


def test_gradient_accumulation_and_early_stopping(tiny_checkpoints):
    recipe, result = _run(
        tiny_recipe(
            tiny_checkpoints["bert"],
            training={"max_steps": None, "num_epochs": 50, "batch_size": 8, "gradient_accumulation_steps": 4,
                      "learning_rate": 1e-7, "eval_strategy": "steps", "eval_steps": 1,
                      "early_stopping_patience": 2, "scheduler": "cosine"},
        )
    )
    # 256 examples / (8 x 4) = 8 optimizer steps per epoch; a learning rate of 1e-7 never improves the
    # metric after the first evaluation, so patience 2 stops the run at step 3.
    assert result.steps == 3


def test_max_steps_stops_mid_epoch_and_evaluates_at_the_end(tiny_checkpoints):
    recipe, result = _run(tiny_recipe(tiny_checkpoints["distilbert"], training={"max_steps": 3, "eval_strategy": "epoch"}))
    assert result.steps == 3
    assert "accuracy" in result.best_metrics


def test_test_split_is_scored_with_the_best_model(tiny_checkpoints):
    dev = str(DATA / "sst2" / "dev.tsv")
    recipe, result = _run(
        tiny_recipe(
            tiny_checkpoints["bert"],
            data={"files": {"train": str(DATA / "sst2" / "train.tsv"), "validation": dev, "test": dev},
                  "test_split": "test", "max_eval_samples": None},
        )
    )
    # The test file is the validation file, so the best model scores the same on both.
    assert result.test_metrics["accuracy"] == pytest.approx(result.best_metrics["accuracy"])


def test_diverging_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_checkpoints, tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], output_dir=str(tmp_path / "out"),
        training={"max_steps": 12, "eval_strategy": "steps", "eval_steps": 2, "logging_steps": 1,
                  "learning_rate": 0.5, "max_grad_norm": None, "warmup_ratio": 0.0, "scheduler": "constant"},
    ))
    import torch

    real_forward = type(torch.nn.Module()).__call__
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):  # the outputs (so the loss) turn NaN from the 5th training batch on
        out = real_forward(model, *args, **kwargs)
        if model.training and getattr(out, "logits", None) is not None:
            calls["n"] += 1
            if calls["n"] >= 5:
                out.logits = out.logits * float("nan")
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "__call__", poisoned)
        with pytest.raises(train.TrainingDiverged, match=r"not a finite number at step 5 .*last good checkpoint is .*step-4"):
            train.main(recipe)
    assert (tmp_path / "out" / "checkpoints" / "step-4" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "checkpoints" / "step-6").exists()


def test_a_run_after_an_accelerator_of_another_precision_in_the_same_process(tiny_checkpoints):
    """A Trainer(bf16=True) or an Accelerator(mixed_precision="bf16") earlier in a notebook or test process used to
    make the next fp32 run fail with "AcceleratorState has already been initialized" (CI on a bf16 CPU, where
    bench/train.py --quick runs the Trainer with --bf16 in the test process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized

    Accelerator(cpu=True, mixed_precision="bf16")
    assert AcceleratorState().mixed_precision == "bf16"
    recipe, result = _run(tiny_recipe(tiny_checkpoints["bert"], training={"max_steps": 2, "mixed_precision": "no"}))
    assert result.steps == 2 and not is_initialized()  # the run's own state is released when it ends
    # And the other way: what the process does after a run is not refused for the run's precision.
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    recipe, result = _run(tiny_recipe(tiny_checkpoints["bert"], training={"max_steps": 1, "mixed_precision": "no"}))
    assert result.steps == 1
