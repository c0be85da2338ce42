"""Long texts for short-context models: overlapping windows, trained on with the text's label, pooled into one answer."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.models.predictor import Predictor
from finetune.config.recipe import Recipe, RecipeError, load_recipe
from finetune.tasks.sequence import pool_windows
from finetune.tasks import softmax
from tests.conftest import tiny_recipe, write_recipe

LONG = " ".join(["a gripping , beautiful film with a dull and tedious middle ."] * 6)


def test_pooling_by_hand():
    rows = [np.array([1.0, 0.0]), np.array([3.0, -2.0]), np.array([0.0, 5.0]), np.array([2.0, 2.0])]
    owners = [0, 0, 1, 0]
    assert pool_windows(rows, owners, 2, "mean").tolist() == [[2.0, 0.0], [0.0, 5.0]]
    assert pool_windows(rows, owners, 2, "max").tolist() == [[3.0, 2.0], [0.0, 5.0]]


@pytest.mark.parametrize("change, message", [
    ({"task": {"type": "token_classification", "long_inputs": "chunk"}}, "chunk is for classification"),
    ({"task": {"type": "classification", "long_inputs": "chunk", "chunk_stride": 40}}, "task.chunk_stride (40) must be under half"),
])
def test_chunking_settings_are_checked(tiny_checkpoints, tmp_path, change, message):
    recipe = tiny_recipe(tiny_checkpoints["bert"], **change)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


@pytest.fixture(scope="module")
def chunked(tiny_checkpoints, tmp_path_factory):
    from tests.conftest import train_outside_test

    root = tmp_path_factory.mktemp("chunked")
    recipe = tiny_recipe(tiny_checkpoints["bert"], model={"checkpoint": str(tiny_checkpoints["bert"]), "max_length": 16},
                         task={"type": "classification", "long_inputs": "chunk", "chunk_stride": 4, "chunk_pooling": "max"},
                         output_dir=str(root / "run"), tracking={"log_model": False, "system_metrics": False})
    return train_outside_test(root, recipe), recipe


def test_training_on_windows_and_evaluating_per_text(chunked):
    from finetune.data import features as D
    from finetune.models.modeling import load_tokenizer
    from finetune.tasks import get_task

    result, recipe = chunked
    assert 0 <= result.best_metrics["accuracy"] <= 1
    parsed = Recipe.model_validate(recipe)
    prepared = D.prepare(parsed, get_task("classification"), load_tokenizer(recipe["model"]["checkpoint"]))
    # SST-2 sentences are often longer than 16 tokens: more windows than texts, each window at most 16 tokens,
    # and every evaluation window knows its text
    assert len(prepared.train) > recipe["data"]["max_train_samples"]
    assert max(len(ids) for ids in prepared.train["input_ids"]) <= 16
    assert sorted(set(prepared.eval_features["example_id"])) == list(range(len(prepared.raw_eval)))
    assert "example_id" not in prepared.eval.column_names


def test_served_answer_is_the_pooled_windows(chunked):
    result, _ = chunked
    predictor = Predictor.from_dir(result.best_dir)
    assert predictor.settings.long_inputs == "chunk" and predictor.settings.chunk_pooling == "max"
    (answer,) = predictor.predict([LONG])
    assert answer["truncated"] is False
    encoded = predictor.encode_inputs([LONG])
    assert len(encoded.features) > 3 and set(encoded.owner) == {0}
    windows = np.stack(predictor.outputs(encoded.features))
    # Scores are calibrated (task.calibration, on by default): the softmax of the pooled logits over the temperature.
    temperature = predictor.settings.temperature or 1.0
    expected = softmax(windows.max(axis=0, keepdims=True) / temperature)[0]
    assert [answer["scores"][n] for n in predictor.info.label_names] == pytest.approx(expected.tolist())
    # a short text is one window, answered as without chunking
    assert len(predictor.encode_inputs(["a fine film"]).features) == 1
