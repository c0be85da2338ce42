"""Continued pretraining (task.type masked_lm): masking statistics, the tied head, training, resuming, refusals."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np
import pytest
import torch

from finetune.cli import main as cli
from finetune.config.recipe import Recipe, load_recipe
from finetune.errors import ExportError, ModelSourceError
from finetune.models.modeling import build_model, load_tokenizer, make_collator
from finetune.models.pretrained import resolve_checkpoint
from finetune.tasks import IGNORE_INDEX, FeatureContext, TaskSettings, get_task
from finetune.tasks.masked_lm import MASKED_LM, NO_WORD, MaskingCollator, split_into_sequences
from finetune.training import train
from tests.conftest import DATA, TEST_DATA, tiny_recipe, write_recipe

SST2_TRAIN = DATA / "sst2" / "train.tsv"


def mlm_recipe(checkpoint, **sections) -> dict:
    """A tiny masked_lm recipe on the SST-2 sample's sentences (no labels read), 10% held out."""
    recipe = tiny_recipe(checkpoint, task={"type": "masked_lm"},
                         data={"files": {"train": str(SST2_TRAIN)}, "quoting": "none", "text_column": "sentence",
                               "max_train_samples": 600, "validation_size": 0.1},
                         training={"max_steps": 8, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 2e-3,
                                   "logging_steps": 2},
                         tracking={"system_metrics": False, "experiment": "mlm"})
    recipe["name"] = "tiny-mlm"
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    return recipe


def _sentences(n: int) -> list[str]:
    lines = SST2_TRAIN.read_text(encoding="utf-8").splitlines()[1 : n + 1]
    return [line.split("\t")[0] for line in lines]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    return load_tokenizer(tiny_checkpoints["bert"])


def _features(tokenizer, texts, train=True, **settings):
    ctx = FeatureContext(data=Recipe.model_validate(mlm_recipe("x")).data, tokenizer=tokenizer, max_length=64,
                         settings=TaskSettings(**settings), label_names=None, train=train)
    out = MASKED_LM.features({"sentence": texts}, list(range(len(texts))), ctx)
    return [{k: out[k][i] for k in out} for i in range(len(out["input_ids"]))]


def test_masking_statistics_on_a_fixed_batch(tokenizer):
    features = _features(tokenizer, _sentences(800))
    collate = MaskingCollator(tokenizer, None, 0.15)
    original = collate.tokenizer.pad([{"input_ids": f["input_ids"]} for f in features], return_tensors="pt")["input_ids"]
    words = torch.full(original.shape, NO_WORD)
    for i, f in enumerate(features):
        words[i, : len(f["word_ids"])] = torch.tensor(f["word_ids"])
    batch = collate(features)
    targets = batch["labels"] != IGNORE_INDEX

    # 15% of the tokens that can be masked become targets; the labels are the original tokens there.
    maskable = words >= 0
    share = targets.sum().item() / maskable.sum().item()
    assert 0.13 < share < 0.17, share
    assert torch.equal(batch["labels"][targets], original[targets])
    # Special tokens ([CLS], [SEP] between packed texts, padding) are never targets.
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert special.sum() > len(features) * 2 and not (targets & special).any()
    assert not (targets & ~maskable).any()
    # 80% of the targets read [MASK], 10% a random other token, 10% themselves.
    shown = batch["input_ids"][targets]
    masked = (shown == tokenizer.mask_token_id).float().mean().item()
    kept = (shown == original[targets]).float().mean().item()
    assert 0.77 < masked < 0.83 and 0.07 < kept < 0.13 and 0.07 < 1 - masked - kept < 0.13, (masked, kept)
    assert not torch.isin(shown, torch.tensor([tokenizer.pad_token_id, tokenizer.cls_token_id])).any()
    # Whole words: every piece of a chosen word is a target, and words of several pieces were chosen.
    split_words = 0
    for row in range(len(features)):
        for word in words[row][maskable[row]].unique():
            pieces = targets[row][words[row] == word]
            assert pieces.all() or not pieces.any(), (row, word)
            split_words += int(pieces.all() and len(pieces) > 1)
    assert split_words > 20
    # Every sequence has something to predict.
    assert targets.any(dim=1).all()
    # Masks depend on the batch alone (a resumed run redraws the same ones) ...
    assert torch.equal(collate(features)["labels"], batch["labels"])
    # ... and a sequence gets other masks in another batch: each epoch, when batches are drawn anew.
    moved = collate([features[-1]] + features[:-1])
    assert not torch.equal(moved["labels"][1 : len(features)], batch["labels"][: len(features) - 1])


def test_without_whole_words_pieces_are_chosen_alone(tokenizer):
    features = _features(tokenizer, _sentences(400), whole_word_mask=False)
    words = [[w for w in f["word_ids"] if w != NO_WORD] for f in features]
    assert all(len(set(w)) == len(w) for w in words), "every piece is a word of its own"
    batch = MaskingCollator(tokenizer, None, 0.15)(features)
    share = (batch["labels"] != IGNORE_INDEX).sum().item() / sum(map(len, words))
    assert 0.13 < share < 0.17


def test_packing_fills_sequences_and_keeps_every_token(tokenizer):
    texts = _sentences(300)
    packed = split_into_sequences(tokenizer, texts, 64, pack=True, whole_words=True)
    alone = split_into_sequences(tokenizer, texts, 64, pack=False, whole_words=True)
    assert all(len(ids) == 64 for ids, _ in packed[:-1]) and len(packed) < len(texts) <= len(alone)
    inner = [t for ids, _ in packed for t in ids[1:-1] if t != tokenizer.sep_token_id]
    assert inner == [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert all(ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id for ids, _ in packed)


def test_evaluation_masks_are_the_same_every_time(tokenizer):
    first = _features(tokenizer, _sentences(200), train=False)
    second = _features(tokenizer, _sentences(200), train=False)
    assert first == second and all(any(x != IGNORE_INDEX for x in f["labels"]) for f in first)
    batch = MaskingCollator(tokenizer, None, 0.15)(first)  # labelled features are padded, not masked again
    assert batch["input_ids"][0, : len(first[0]["input_ids"])].tolist() == first[0]["input_ids"]
    assert batch["labels"][0, : len(first[0]["labels"])].tolist() == first[0]["labels"]


@pytest.mark.parametrize("family", ["bert", "distilbert", "big_bird"])
def test_a_new_head_is_tied_to_the_embeddings_and_announced(tiny_checkpoints, family, capsys):
    recipe = Recipe.model_validate(mlm_recipe(tiny_checkpoints[family], model={"max_length": 80, **(
        {"attention_type": "block_sparse"} if family == "big_bird" else {})}))
    model, _ = build_model(resolve_checkpoint(recipe.model.checkpoint), recipe.model, MASKED_LM, None)
    out = capsys.readouterr().out
    assert "has no masked-language-model head: a new one was initialised" in out
    assert "its output projection tied to the word embeddings" in out
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if family == "bert":  # BertForMaskedLM has no pooler: the checkpoint's is carried, frozen, for fine-tuning
        from safetensors.torch import load_file

        saved = load_file(str(tiny_checkpoints["bert"] / "model.safetensors"))
        assert torch.equal(model.bert.pooler.dense.weight, saved["pooler.dense.weight"])
        assert not model.bert.pooler.dense.weight.requires_grad


def test_masked_lm_loss_equals_the_heads_own(tiny_checkpoints):
    from finetune.data.features import prepare

    recipe = Recipe.model_validate(mlm_recipe(tiny_checkpoints["bert"]))
    tokenizer = load_tokenizer(recipe.model.checkpoint)
    data = prepare(recipe, MASKED_LM, tokenizer)
    model, _ = build_model(resolve_checkpoint(recipe.model.checkpoint), recipe.model, MASKED_LM, None)
    batch = make_collator(tokenizer, model.config, MASKED_LM, TaskSettings.of(recipe.task))([data.train[i] for i in range(8)])
    inputs, targets = MASKED_LM.split_batch(batch)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(MASKED_LM.loss(model(**inputs), targets, TaskSettings()),
                                   model(**inputs, **targets).loss)



@pytest.mark.parametrize("family", ["bert", "distilbert", "big_bird"])
def test_the_head_computes_only_masked_positions_with_the_same_loss_gradients_and_scores(tiny_checkpoints, family):
    """`MaskedLMTask.forward` gives the head only the masked positions: (masked tokens x vocabulary) logits, and the
    loss, every gradient and the evaluation tensors at the masked positions are those of the full logits."""
    from finetune.data.features import prepare

    model_section = {"max_length": 80, **({"attention_type": "block_sparse"} if family == "big_bird" else {})}
    recipe = Recipe.model_validate(mlm_recipe(tiny_checkpoints[family], model=model_section))
    tokenizer = load_tokenizer(recipe.model.checkpoint)
    data = prepare(recipe, MASKED_LM, tokenizer)
    model, _ = build_model(resolve_checkpoint(recipe.model.checkpoint), recipe.model, MASKED_LM, None)
    batch = make_collator(tokenizer, model.config, MASKED_LM, TaskSettings.of(recipe.task))([data.train[i] for i in range(8)])
    inputs, targets = MASKED_LM.split_batch(batch)
    masked = targets["labels"] != IGNORE_INDEX
    model.train()  # dropout off through the seed: both passes draw the same masks
    results = {}
    for way in ("full", "masked only"):
        model.zero_grad()
        torch.manual_seed(0)
        outputs = model(**inputs) if way == "full" else MASKED_LM.forward(model, inputs, targets)
        loss = MASKED_LM.loss(outputs, targets, TaskSettings())
        loss.backward()
        results[way] = (outputs.logits, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        MASKED_LM.eval_tensors(outputs, batch))
    full, sparse = results["full"], results["masked only"]
    assert sparse[0].shape == (int(masked.sum()), model.config.vocab_size) and full[0].dim() == 3
    # Sums taken in another order (the decoder's gradient over fewer rows) differ in the last float32 bits only.
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse[0], full[0][masked], **close)
    torch.testing.assert_close(sparse[1], full[1], **close)
    assert full[2].keys() == sparse[2].keys() and len(full[2]) > 10
    for name, grad in full[2].items():
        torch.testing.assert_close(sparse[2][name], grad, **close, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(sparse[3]["nll"][masked], full[3]["nll"][masked], **close)
    assert torch.equal(sparse[3]["labels"], full[3]["labels"])
    predicted = sparse[3]["predicted"][masked]  # each the best token of the full logits too (ties aside)
    assert torch.equal(predicted, sparse[0].argmax(dim=-1))
    best = full[0][masked].max(dim=-1).values
    torch.testing.assert_close(full[0][masked].gather(1, predicted[:, None])[:, 0], best, **close)
    assert model(**inputs).logits.dim() == 3  # the hook is idle outside MaskedLMTask.forward

def test_pretraining_lowers_held_out_loss_and_its_output_fine_tunes(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForSequenceClassification

    recipe = Recipe.model_validate(mlm_recipe(tiny_checkpoints["bert"], output_dir=str(tmp_path / "mlm"),
                                              training={"max_steps": 30, "eval_strategy": "steps", "eval_steps": 10},
                                              tracking={"log_model": True}))
    result = train.main(recipe)
    mlflow.set_tracking_uri(recipe.tracking.tracking_uri or mlflow.get_tracking_uri())
    history = [m.value for m in mlflow.MlflowClient().get_metric_history(result.run_id, "eval/perplexity")]
    assert len(history) == 3 and history[-1] < history[0] * 0.8, history
    info = json.loads((result.best_dir / "finetune.json").read_text())
    assert info["task"] == "masked_lm" and info["label_names"] is None
    # The run logged its checkpoint as files (not an MLflow model to serve), and what evaluation measured:
    # perplexity is exp of the mean loss over every masked held-out token.
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"checkpoint", "evaluation", "MODEL_CARD.md"} <= names and "model" not in names
    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="evaluation", dst_path=str(tmp_path))
    summary = json.loads(open(f"{local}/summary.json").read())
    assert summary["perplexity"] == pytest.approx(np.exp(summary["loss"])) == pytest.approx(history[-1])
    assert summary["masked_tokens"] > 100
    assert open(f"{local}/loss_by_position.csv").readline().strip() == "positions,masked_tokens,loss,perplexity,accuracy"

    # The folder is a checkpoint: a classifier starts from its encoder (and the carried pooler), only the head new.
    _, loading = AutoModelForSequenceClassification.from_pretrained(result.best_dir, num_labels=2, output_loading_info=True)
    assert sorted(loading["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    tuned = train.main(Recipe.model_validate(tiny_recipe(result.best_dir, output_dir=str(tmp_path / "tuned"),
                                                         tracking={"log_model": False, "system_metrics": False})))
    assert 0 <= tuned.best_metrics["accuracy"] <= 1


@pytest.mark.parametrize("family", ["distilbert", "big_bird"])
def test_distilbert_and_block_sparse_bigbird_pretrain(tiny_checkpoints, tmp_path, family):
    model = {"max_length": 80, **({"attention_type": "block_sparse"} if family == "big_bird" else {})}
    result = train.main(Recipe.model_validate(mlm_recipe(
        tiny_checkpoints[family], model=model, output_dir=str(tmp_path / "out"),
        data={"max_train_samples": 240}, training={"max_steps": 4, "batch_size": 8})))
    assert np.isfinite(result.best_metrics["perplexity"])
    if family == "big_bird":  # packed sequences are full length: every training batch runs block-sparse
        assert result.attention_batches == {"block_sparse": 4}


class Interrupted(Exception):
    pass


def test_pretraining_resumes_where_it_stopped(tiny_checkpoints, tmp_path):
    """Masks are drawn from the generator the checkpoints save, so a resumed run ends where an uninterrupted one does."""
    def recipe(out: str) -> Recipe:
        return Recipe.model_validate(mlm_recipe(tiny_checkpoints["bert"], output_dir=out, training={
            "max_steps": 8, "batch_size": 8, "eval_strategy": "steps", "eval_steps": 4}, data={"max_train_samples": 300}))

    whole = train.main(recipe(str(tmp_path / "whole")))

    def crash(step: int, metrics: dict) -> bool:
        if step == 4:
            raise Interrupted
        return False

    with pytest.raises(Interrupted):
        train.main(recipe(str(tmp_path / "broken")), hooks=train.TrainingHooks(on_evaluate=crash))
    resumed = train.main(recipe(str(tmp_path / "broken")), resume_run=True)
    assert resumed.resumed_from == 4
    assert resumed.best_metrics == pytest.approx(whole.best_metrics, abs=1e-6)


def test_a_masked_lm_checkpoint_is_not_served_predicted_or_exported(tiny_checkpoints, tmp_path, capsys):
    from finetune.export.onnx import export_onnx
    from finetune.tracking.sources import load_predictor, locate

    result = train.main(Recipe.model_validate(mlm_recipe(
        tiny_checkpoints["bert"], output_dir=str(tmp_path / "mlm"), training={"max_steps": 2},
        tracking={"log_model": False})))
    best = str(result.best_dir)
    with pytest.raises(ModelSourceError, match="is a masked_lm checkpoint .* Fine-tune it: set model.checkpoint"):
        load_predictor(locate(best))  # what finetune serve loads through
    capsys.readouterr()
    assert cli(["predict", best, "a gripping film"]) == 2
    assert "is a masked_lm checkpoint" in capsys.readouterr().err
    with pytest.raises(ExportError, match="is a masked_lm checkpoint"):
        export_onnx(best, tmp_path / "onnx", check=False)


def test_recipes_and_the_pretrain_command_check_what_they_are_given(tiny_checkpoints, tmp_path, capsys):
    base = mlm_recipe(tiny_checkpoints["bert"])
    with pytest.raises(ValueError, match="tracking.register_as: a masked_lm run makes a checkpoint to fine-tune"):
        Recipe.model_validate({**base, "tracking": {"register_as": "x"}})
    with pytest.raises(ValueError, match="data.text_pair_column is not used by task.type masked_lm"):
        Recipe.model_validate({**base, "data": {**base["data"], "text_pair_column": "label"}})
    with pytest.raises(ValueError, match="Input should be 'masked_lm' \\(continued pretraining"):
        Recipe.model_validate({**base, "task": {"type": "masked-lm"}})
    path = write_recipe(tmp_path / "clf.yaml", tiny_recipe(tiny_checkpoints["bert"]))
    assert cli(["pretrain", str(path)]) == 2
    assert "finetune pretrain trains task.type masked_lm, and this recipe's task is classification" in capsys.readouterr().err
    assert cli(["fields"]) == 0
    fields = capsys.readouterr().out
    for key in ("task.mlm_probability", "task.whole_word_mask", "task.pack_sequences", "data.texts_from",
                "distillation.teacher", "distillation.alpha"):
        assert key in fields, key
    assert "masked_lm" in fields.split("task.type (", 1)[1].split(")", 1)[0]


def test_texts_of_another_recipe_and_text_files(tiny_checkpoints, tmp_path):
    from finetune.data.loading import load_splits

    other = write_recipe(tmp_path / "other.yaml", tiny_recipe(tiny_checkpoints["bert"], "pair"))
    recipe = load_recipe(write_recipe(tmp_path / "tapt.yaml", {
        **mlm_recipe(tiny_checkpoints["bert"]), "data": {"texts_from": str(other), "validation_size": 0.2}}))
    _, train_split, held_out, _ = load_splits(recipe, get_task("masked_lm"))
    texts = list(train_split["text"]) + list(held_out["text"])
    with open(TEST_DATA / "mrpc_sample.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    # Both sentences of every pair (its whole train split), each once; not its labels.
    assert sorted(texts) == sorted({r[c].strip() for r in rows for c in ("sentence1", "sentence2")})
    assert len(held_out) == round(0.2 * len(texts))
    with pytest.raises(ValueError, match="data.texts_from takes the texts of another recipe; give it alone"):
        Recipe.model_validate({**recipe.model_dump(), "data": {"texts_from": str(other), "files": {"train": "x"}}})

    lines = tmp_path / "corpus.txt"
    lines.write_text("the first line of a corpus\n\nand a second one\n", encoding="utf-8")
    recipe = Recipe.model_validate(mlm_recipe(tiny_checkpoints["bert"], data={
        "files": {"train": str(lines), "validation": str(lines)}, "text_column": "text", "quoting": "minimal",
        "max_train_samples": None}))
    _, train_split, _, _ = load_splits(recipe, get_task("masked_lm"))
    assert "the first line of a corpus" in train_split["text"]
