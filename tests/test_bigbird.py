"""BigBird: the attention type is chosen per batch, restored after it, and block-sparse really runs."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from finetune.training import train
from tests.conftest import FLOAT32_BATCH_RTOL, assert_equal_up_to_float32_rounding
from finetune.models.bigbird import (
    attention_for_batch, attention_for_length, default_sparse_min_length, min_sparse_length, plan_batches, sparse_min_length,
)
from finetune.config.recipe import Recipe, RecipeError, load_recipe
from tests.conftest import DATA, tiny_recipe, write_recipe


def test_attention_rule():
    # block 8, 2 random blocks: transformers needs more than (5 + 2*2) * 8 = 72 tokens for block-sparse
    assert min_sparse_length(8, 2) == 73
    assert default_sparse_min_length(8, 2) == 80  # the first padded length (a multiple of 8) past 72
    assert attention_for_length("block_sparse", 72, 8, 2) == "original_full"
    assert attention_for_length("block_sparse", 80, 8, 2) == "block_sparse"
    assert attention_for_length("original_full", 800, 8, 2) == "original_full"
    # a recipe's threshold moves the switch, but never below what transformers can run
    assert attention_for_length("block_sparse", 88, 8, 2, min_length=96) == "original_full"
    assert attention_for_length("block_sparse", 96, 8, 2, min_length=96) == "block_sparse"
    assert attention_for_length("block_sparse", 72, 8, 2, min_length=10) == "original_full"


def test_rule_below_the_block_sparse_minimum_is_refused_naming_the_field(tiny_checkpoints, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoints["big_bird"])
    assert sparse_min_length(config) == 80 and sparse_min_length(config, 96) == 96
    with pytest.raises(ValueError, match=r"model.sparse_attention_min_length: 64 .* allowed: at least 73"):
        sparse_min_length(config, 64)
    base = tiny_recipe(tiny_checkpoints["big_bird"], model={"checkpoint": str(tiny_checkpoints["big_bird"]), "max_length": 128,
                                                            "attention_type": "block_sparse", "block_size": 8,
                                                            "num_random_blocks": 2})
    path = write_recipe(tmp_path / "r.yaml", base)
    with pytest.raises(RecipeError, match=r"model.sparse_attention_min_length: 64 is below the 73 tokens .* allowed: at least 73"):
        load_recipe(path, ["model.sparse_attention_min_length=64"])
    with pytest.raises(RecipeError, match=r"applies only with model.attention_type block_sparse"):
        load_recipe(path, ["model.sparse_attention_min_length=96", "model.attention_type=original_full"])
    assert load_recipe(path, ["model.sparse_attention_min_length=96"]).model.sparse_attention_min_length == 96


def test_plan_batches_keeps_block_sparse_inputs_apart(tiny_checkpoints):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoints["big_bird"])  # block 8: full below 80 tokens
    lengths = [10, 120, 70, 118, 30, 90, 79]
    batches = plan_batches(lengths, 4, config)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    padded = lambda i: -(-lengths[i] // 8) * 8  # noqa: E731
    for batch in batches:
        kinds = {padded(i) if padded(i) >= 80 else "full" for i in batch}
        assert len(kinds) == 1, f"batch {batch} mixes {kinds}"
    assert any(set(b) == {0, 2, 4} for b in batches)  # 10, 70 and 30 tokens: full attention, one batch
    assert [6] in batches  # 79 pads to 80: block-sparse, and no other input pads to 80
    assert any(set(b) == {1, 3} for b in batches)  # 118 and 120 both pad to 120


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


def mixed_length_recipe(checkpoint, data_file, **model) -> dict:
    """A tiny block-sparse recipe on `_mixed_length_file` data: short batches and long ones in every epoch."""
    return tiny_recipe(
        checkpoint,
        model={"checkpoint": str(checkpoint), "max_length": 128, "attention_type": "block_sparse", **model},
        data={"files": {"train": str(data_file), "validation": str(data_file)}, "quoting": "minimal", "text_column": "text",
              "label_column": "label", "label_names": ["negative", "positive"], "max_train_samples": None,
              "max_eval_samples": None},
        training={"max_steps": 12, "batch_size": 2, "eval_batch_size": 4},
    )


@pytest.fixture
def attention_spy(monkeypatch):
    """Every batch the training loop runs: (padded length, type the rule chose, type the forward pass ran with,
    training mode). Fails if the model is not back in its configured type after a batch."""
    seen: list[tuple[int, str, str, bool]] = []
    real = train.attention_for_batch

    @contextmanager
    def spy(model, input_ids, counts=None):
        with real(model, input_ids, counts) as chosen:
            yield chosen
            # read after the forward pass: had transformers fallen back on its own, this would show it
            seen.append((input_ids.shape[-1], chosen, model.base_model.attention_type, model.training))
        assert model.base_model.attention_type == model.config.attention_type

    from finetune.training import evaluation

    monkeypatch.setattr(train, "attention_for_batch", spy)
    monkeypatch.setattr(evaluation, "attention_for_batch", spy)
    return seen


def test_block_sparse_training_on_mixed_lengths(tiny_checkpoints, tmp_path, attention_spy):
    data_file = _mixed_length_file(tmp_path / "mixed.csv")
    # 96 rather than the default 80: the rule is the recipe's, not a constant
    recipe = Recipe.model_validate(mixed_length_recipe(tiny_checkpoints["big_bird"], data_file, sparse_attention_min_length=96))
    result = train.main(recipe)
    # Both kinds of batch occurred in the same run, each with the attention its length allows ...
    assert result.attention_batches.get("block_sparse", 0) > 0
    assert result.attention_batches.get("original_full", 0) > 0
    # ... every batch, in training and in evaluation, ran with exactly the type the rule gives its padded length ...
    assert {training for *_, training in attention_spy} == {True, False}
    for length, chosen, ran, _ in attention_spy:
        assert length % 8 == 0
        assert chosen == ran == ("block_sparse" if length >= 96 else "original_full"), (length, chosen, ran)
    # ... and the saved model keeps the configured type, not whatever the last batch used, and states the rule.
    config = json.loads((result.best_dir / "config.json").read_text())
    assert config["attention_type"] == "block_sparse"
    assert config["block_size"] == 8
    assert config["sparse_attention_min_length"] == 96
    assert json.loads((result.best_dir / "finetune.json").read_text())["sparse_attention_min_length"] == 96


def test_eval_outputs_are_deterministic(tiny_checkpoints):
    """Block-sparse draws random blocks only in training mode; in evaluation the same input gives the same
    logits every time, alone or batched with inputs of other lengths, and after training-mode passes."""
    from transformers import AutoTokenizer

    from finetune.models.bigbird import attention_for_config
    from finetune.models.modeling import ModelInfo
    from finetune.models.predictor import Predictor

    path = tiny_checkpoints["big_bird"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    for weight in model.classifier.parameters():  # a fresh head's tiny weights would hide differences in the encoder
        torch.nn.init.normal_(weight, std=1.0)
    info = ModelInfo(task="classification", label_names=["negative", "positive"], text_pair=False, max_length=256)
    predictor = Predictor(model, AutoTokenizer.from_pretrained(path), info, batch_size=8)
    with open(DATA / "sst2" / "train.tsv", encoding="utf-8") as f:
        sentences = [line.split("\t")[0] for line in list(f)[1:40]]
    long_text, medium, short = " ".join(sentences), " ".join(sentences[:5]), sentences[0]
    features, _ = predictor.encode([long_text, medium, short], None)
    padded = [-(-len(f["input_ids"]) // 8) * 8 for f in features]
    assert attention_for_config(model.config, padded[0]) == "block_sparse", padded
    assert attention_for_config(model.config, padded[2]) == "original_full", padded

    alone = predictor.logits([long_text], None)
    assert np.array_equal(predictor.logits([long_text], None), alone)
    model.train()
    with attention_for_batch(model, torch.tensor([features[0]["input_ids"]])):
        model(input_ids=torch.tensor([features[0]["input_ids"]]))  # draws random blocks (and reseeds numpy)
    model.eval()
    assert np.array_equal(predictor.logits([long_text], None), alone)
    # Batched with others, only float rounding of a larger matrix product may differ: same attention, same blocks.
    mixed = predictor.logits([short, long_text, medium, long_text], None)
    assert_equal_up_to_float32_rounding(mixed[[1, 3]], np.repeat(alone, 2, axis=0))
    assert_equal_up_to_float32_rounding(mixed[0], predictor.logits([short], None)[0])
    assert np.array_equal(predictor.logits([short, long_text, medium, long_text], None), mixed)
    # What that grouping prevents: padded to the long input's length, the medium one gets another block layout.
    # Shown on the encoder's hidden states (on a tiny random model the pooled logits hide most of it): the
    # layout changes them by about 3e-3 of their magnitude, 30x the rounding tolerance; the check asks for 10x.
    batch = predictor.collator([features[0], features[1]])
    alone_batch = predictor.collator([features[1]])
    with torch.inference_mode():
        with attention_for_batch(model, batch["input_ids"]):
            padded_with_long = model.base_model(**batch).last_hidden_state[1].numpy()
        with attention_for_batch(model, alone_batch["input_ids"]):
            by_itself = model.base_model(**alone_batch).last_hidden_state[0].numpy()
    n = by_itself.shape[0]
    assert np.abs(padded_with_long[:n] - by_itself).max() > 10 * FLOAT32_BATCH_RTOL * np.abs(by_itself).max()
    assert model.base_model.attention_type == "block_sparse"


def test_batches_are_padded_to_a_multiple_of_the_block_size(tiny_checkpoints):
    from transformers import AutoConfig, AutoTokenizer

    from finetune.models.modeling import make_collator

    path = tiny_checkpoints["big_bird"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    from finetune.tasks import get_task

    collator = make_collator(tokenizer, AutoConfig.from_pretrained(path), get_task("classification"))
    batch = collator([tokenizer("a short one"), tokenizer("the film is a long and winding road to nowhere at all")])
    assert batch["input_ids"].shape[1] % 8 == 0


@pytest.mark.e2e
def test_serving_long_documents_with_the_trained_rule(tiny_checkpoints, tmp_path):
    """The server reads documents up to the model's length with the rule the model was trained with, flags
    what it truncated, and answers an input the same whether it comes alone or with others."""
    import httpx

    from finetune.models.predictor import Predictor
    from tests.test_serving import Server

    data_file = _mixed_length_file(tmp_path / "mixed.csv")
    recipe = mixed_length_recipe(tiny_checkpoints["big_bird"], data_file, sparse_attention_min_length=96)
    recipe["training"]["max_steps"] = 2
    best = train.main(Recipe.model_validate(recipe)).best_dir
    predictor = Predictor.from_dir(best)
    with open(DATA / "sst2" / "train.tsv", encoding="utf-8") as f:
        sentences = [line.split("\t")[0] for line in list(f)[1:60]]
    too_long, short = " ".join(sentences), sentences[1]

    def tokens(text: str) -> tuple[int, bool]:
        features, truncated = predictor.encode([text], None)
        return len(features[0]["input_ids"]), truncated[0]

    # long enough for block-sparse (96 and more after padding), short enough not to be cut
    words = too_long.split()
    fits = next(text for text in (" ".join(words[:n]) for n in range(20, len(words)))
                if tokens(text)[0] >= 100 and not tokens(text)[1])

    server = Server("--model", str(best), "--max-wait-ms", "20")
    try:
        info = httpx.get(f"{server.url}/v1/model").json()
        assert info["max_length"] == 128 and info["sparse_attention_min_length"] == 96
        together = server.post({"inputs": [short, too_long, fits]}).json()["predictions"]
        assert [p["truncated"] for p in together] == [False, True, False]
        alone = [server.post({"inputs": [text]}).json()["predictions"][0] for text in (short, too_long, fits)]
        again = [server.post({"inputs": [text]}).json()["predictions"][0] for text in (short, too_long, fits)]
        assert alone == again  # the same input, the same answer, every time
        for a, b in zip(together, alone):
            assert_equal_up_to_float32_rounding(list(a["scores"].values()), list(b["scores"].values()))
        expected = predictor.predict([short, too_long, fits])  # in process: the same rule and batching
        for got, want in zip(together, expected):
            assert_equal_up_to_float32_rounding(list(got["scores"].values()), list(want["scores"].values()))
        refused = server.post({"inputs": [too_long], "options": {"truncate": False}})
        assert refused.status_code == 422 and "longer than the 128 tokens" in refused.text
    finally:
        server.stop()


def test_block_sparse_attention_runs_under_bf16_autocast(tiny_checkpoints):
    """transformers' block-sparse attention fails under autocast; with `sparse_attention_in_fp32` the sparse core
    runs in fp32 while the projections run in bf16, forward and backward, close to the fp32 answers."""
    from finetune.models.bigbird import sparse_attention_in_fp32
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    torch.manual_seed(0)
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints["big_bird"], num_labels=2)
    inputs = {"input_ids": torch.randint(5, 100, (2, 96)), "labels": torch.tensor([0, 1])}
    assert plain.base_model.attention_type == "block_sparse"  # and 96 tokens are enough for it to run
    with pytest.raises(RuntimeError, match="scatter"), torch.autocast("cpu", dtype=torch.bfloat16):
        plain(**inputs)  # transformers as it is; if this stops failing, it was fixed there and the wrapper can go

    model = sparse_attention_in_fp32(plain)
    dtypes = []
    for module in model.modules():
        if isinstance(module, BigBirdBlockSparseAttention):
            module.query.register_forward_hook(lambda m, i, out: dtypes.append(("query", out.dtype)))
            module.register_forward_hook(lambda m, i, out: dtypes.append(("sparse core", out[0].dtype)))
    model.eval()
    with torch.no_grad(), attention_for_batch(model, inputs["input_ids"]):
        fp32 = model(**inputs).logits
        assert set(dtypes) == {("query", torch.float32), ("sparse core", torch.float32)}
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(**inputs).logits.float()
    assert set(dtypes) == {("query", torch.bfloat16), ("sparse core", torch.float32)}
    # bf16 keeps 8 bits of mantissa: the logits agree to a few parts in a hundred of their spread, not to rounding.
    assert (bf16 - fp32).abs().max() <= 0.05 * fp32.abs().max() + 1e-3
    model.train()
    with attention_for_batch(model, inputs["input_ids"]), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    query = next(m for m in model.modules() if isinstance(m, BigBirdBlockSparseAttention)).query
    assert torch.isfinite(loss) and query.weight.grad is not None and query.weight.grad.abs().sum() > 0


def test_block_sparse_bigbird_trains_and_serves_in_bf16(tiny_checkpoints, tmp_path, monkeypatch):
    """A block-sparse recipe with mixed_precision bf16 trains (its block-sparse batches under autocast), and the
    model predicts in bf16 close to fp32."""
    from finetune.models import bigbird
    from finetune.models.predictor import Predictor

    seen = []
    real = bigbird._block_sparse_core_in_fp32

    def spy(self, query, *rest, **kwargs):
        seen.append((self.training, torch.is_autocast_enabled("cpu"), query.dtype))
        return real(self, query, *rest, **kwargs)

    monkeypatch.setattr(bigbird, "_block_sparse_core_in_fp32", spy)
    data_file = _mixed_length_file(tmp_path / "mixed.csv")
    recipe = mixed_length_recipe(tiny_checkpoints["big_bird"], data_file)
    recipe["training"]["mixed_precision"] = "bf16"
    result = train.main(Recipe.model_validate(recipe))
    assert result.attention_batches.get("block_sparse", 0) > 0
    assert (True, True, torch.bfloat16) in seen  # training: block-sparse batches under bf16 autocast
    assert (False, False, torch.float32) in seen  # evaluation: fp32, as serving's default
    assert all(autocast == training for training, autocast, _ in seen)
    texts = [" ".join(["a long and thoughtful review of a film"] * 12), "short"]
    fp32 = Predictor.from_dir(result.best_dir).logits(texts, None)
    seen.clear()
    bf16 = Predictor.from_dir(result.best_dir, precision="bf16").logits(texts, None)
    assert (False, True, torch.bfloat16) in seen  # the long text ran block-sparse under autocast
    assert np.abs(bf16 - fp32).max() <= 0.05 * np.abs(fp32).max() + 1e-3


def test_inference_precision_is_fp32_bf16_or_fp16():
    from finetune.models.predictor import check_inference_precision

    assert [check_inference_precision(p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="allowed values are fp32, bf16, fp16"):
        check_inference_precision("int4")
