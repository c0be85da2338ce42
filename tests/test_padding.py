"""Batches padded to a multiple of model.pad_to_multiple_of tokens: fewer shapes, never beyond the model's positions."""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from finetune.models.modeling import make_collator
from finetune.tasks import get_task


def _lengths(collator, tokenizer, texts):
    features = [dict(tokenizer(t), labels=0) for t in texts]
    return collator(features)["input_ids"].shape[1], max(len(f["input_ids"]) for f in features)


def test_batches_are_padded_to_the_multiple(tiny_checkpoints):
    path = tiny_checkpoints["bert"]
    tokenizer, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    task = get_task("classification")
    texts = ["a good film", "a rather long and dull film with nothing at all to say"]
    padded, longest = _lengths(make_collator(tokenizer, config, task, pad_to_multiple_of=16, max_length=64), tokenizer, texts)
    assert longest % 16 and padded == -(-longest // 16) * 16
    assert _lengths(make_collator(tokenizer, config, task, pad_to_multiple_of=1, max_length=64), tokenizer, texts)[0] == longest


def test_a_multiple_that_would_pass_the_model_s_positions_is_not_used(tiny_checkpoints):
    path = tiny_checkpoints["bert"]
    tokenizer, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    config.max_position_embeddings = 40  # max_length 40 rounded up to 48 would need positions the model lacks
    texts = ["a rather long and dull film with nothing at all to say"]
    padded, longest = _lengths(make_collator(tokenizer, config, get_task("classification"), pad_to_multiple_of=16,
                                             max_length=40), tokenizer, texts)
    assert padded == longest


def test_big_bird_pads_to_a_multiple_of_both(tiny_checkpoints):
    path = tiny_checkpoints["big_bird"]
    tokenizer, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    assert config.block_size == 8
    padded, _ = _lengths(make_collator(tokenizer, config, get_task("classification"), pad_to_multiple_of=12,
                                       max_length=64), tokenizer, ["a good film"])
    assert padded % 24 == 0


def test_the_default_multiple_pads_long_inputs_and_cpu_bf16_only(monkeypatch):
    import torch

    from finetune.config.recipe import Recipe
    from finetune.training import speed

    def recipe(max_length, precision="no", multiple=None):
        return Recipe.model_validate({"model": {"checkpoint": "x", "max_length": max_length, "pad_to_multiple_of": multiple},
                                      "data": {"files": {"train": "t.csv"}}, "task": {"type": "classification"},
                                      "training": {"mixed_precision": precision}})

    assert speed.pad_multiple(recipe(64)) == 1, "short sentences: rounding up costs more than it saves"
    assert speed.pad_multiple(recipe(256)) == 16 and speed.pad_multiple(recipe(384)) == 16
    assert speed.pad_multiple(recipe(64, multiple=8)) == 8 and speed.pad_multiple(recipe(384, multiple=1)) == 1
    if not torch.cuda.is_available():
        assert speed.pad_multiple(recipe(64, "bf16")) == 16, "bf16 kernels are set up once per shape"
        assert speed.pad_multiple(recipe(256, "bf16")) == 32, "bf16 memory grows with the number of long shapes"
        assert speed.pad_multiple(recipe(256, "bf16", multiple=16)) == 16
