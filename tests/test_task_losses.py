"""Each task computes its loss itself, with the numbers the Hugging Face heads gave when they computed it."""

from __future__ import annotations

import pytest
import torch

from finetune.config.recipe import Recipe
from finetune.data.features import prepare
from finetune.models.modeling import build_model, load_tokenizer, make_collator
from finetune.models.pretrained import resolve_checkpoint
from finetune.tasks import TaskSettings, get_task
from tests.conftest import tiny_recipe


@pytest.mark.parametrize("kind", ["classification", "pair", "regression", "multi_label", "token_classification",
                                  "question_answering", "multiple_choice"])
def test_task_loss_equals_the_heads_own(tiny_checkpoints, kind):
    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], kind))
    task = get_task(recipe.task.type)
    tokenizer = load_tokenizer(recipe.model.checkpoint)
    data = prepare(recipe, task, tokenizer)
    model, _ = build_model(resolve_checkpoint(recipe.model.checkpoint), recipe.model, task, data.label_names)
    batch = make_collator(tokenizer, model.config, task)([data.train[i] for i in range(8)])
    inputs, targets = task.split_batch(batch)
    assert targets and not set(targets) & set(inputs)
    torch.manual_seed(0)
    model.eval()  # no dropout: both losses see the same outputs
    with torch.no_grad():
        ours = task.loss(model(**inputs), targets, TaskSettings.of(recipe.task))
        theirs = model(**inputs, **targets).loss
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, theirs)
