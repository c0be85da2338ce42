"""BigBird: the attention type is chosen per batch, restored after it, and block-sparse really runs."""

from __future__ import annotations

import csv
import json

import torch
from transformers import AutoModelForSequenceClassification

from finetune import train
from finetune.bigbird import attention_for_batch, attention_for_length, min_sparse_length
from finetune.recipe import Recipe
from tests.conftest import DATA, tiny_recipe


def test_attention_rule():
    # block 8, 2 random blocks: transformers needs more than (5 + 2*2) * 8 = 72 tokens for block-sparse
    assert min_sparse_length(8, 2) == 73
    assert attention_for_length("block_sparse", 72, 8, 2) == "original_full"
    assert attention_for_length("block_sparse", 80, 8, 2) == "block_sparse"
    assert attention_for_length("original_full", 800, 8, 2) == "original_full"


def test_guard_chooses_per_batch_and_restores(tiny_checkpoints):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints["big_bird"], num_labels=2).eval()
    assert model.config.attention_type == "block_sparse"
    short, long = torch.randint(5, 100, (2, 16)), torch.randint(5, 100, (2, 96))
    with attention_for_batch(model, short) as chosen:
        assert chosen == "original_full"
        model(input_ids=short)
    assert model.base_model.attention_type == "block_sparse"
    with attention_for_batch(model, long) as chosen:
        assert chosen == "block_sparse"
        assert model.base_model.attention_type == "block_sparse"
        model(input_ids=long)
    assert model.base_model.attention_type == "block_sparse"
    assert model.config.attention_type == "block_sparse"


def _mixed_length_file(path, n=48):
    """Half short sentences, half long documents (several sentences joined), from the shipped sample."""
    with open(DATA / "sst2" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            text = rows[i][0] if i % 2 else " ".join(r[0] for r in rows[i : i + 12])
            writer.writerow([text, rows[i][1]])
    return path


def test_block_sparse_training_on_mixed_lengths(tiny_checkpoints, tmp_path):
    data_file = str(_mixed_length_file(tmp_path / "mixed.csv"))
    recipe = Recipe.model_validate(
        tiny_recipe(
            tiny_checkpoints["big_bird"],
            model={"checkpoint": str(tiny_checkpoints["big_bird"]), "max_length": 128, "attention_type": "block_sparse"},
            data={"files": {"train": data_file, "validation": data_file}, "quoting": "minimal", "text_column": "text",
                  "label_column": "label", "label_names": ["negative", "positive"], "max_train_samples": None,
                  "max_eval_samples": None},
            training={"max_steps": 12, "batch_size": 2, "eval_batch_size": 4},
        )
    )
    result = train.main(recipe)
    # Both kinds of batch occurred in the same run, each with the attention its length allows ...
    assert result.attention_batches.get("block_sparse", 0) > 0
    assert result.attention_batches.get("original_full", 0) > 0
    # ... and the saved model keeps the configured type, not whatever the last batch used.
    config = json.loads((result.best_dir / "config.json").read_text())
    assert config["attention_type"] == "block_sparse"
    assert config["block_size"] == 8


def test_batches_are_padded_to_a_multiple_of_the_block_size(tiny_checkpoints):
    from transformers import AutoConfig, AutoTokenizer

    from finetune.modeling import make_collator

    path = tiny_checkpoints["big_bird"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    collator = make_collator(tokenizer, AutoConfig.from_pretrained(path))
    batch = collator([tokenizer("a short one"), tokenizer("the film is a long and winding road to nowhere at all")])
    assert batch["input_ids"].shape[1] % 8 == 0
