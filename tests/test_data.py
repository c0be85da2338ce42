"""Data loading, labels, carved splits and the tokenisation cache."""

from __future__ import annotations

import datasets
import pytest

from finetune.data.features import prepare
from finetune.data.loading import encode_labels, make_splits, resolve_label_names
from finetune.errors import DataError
from finetune.config.recipe import DataSection, Recipe
from finetune.tasks import get_task
from tests.conftest import tiny_recipe


def _section(**kw) -> DataSection:
    return DataSection(files={"train": "x.csv"}, **kw)


def test_label_names_are_discovered_in_a_stable_order():
    ds = datasets.Dataset.from_dict({"text": ["a"] * 4, "label": ["pos", "neg", "neutral", "neg"]})
    assert resolve_label_names(ds, _section(), get_task("classification")) == ["neg", "neutral", "pos"]
    ints = datasets.Dataset.from_dict({"text": ["a"] * 3, "label": [10, 2, 1]})
    assert resolve_label_names(ints, _section(), get_task("classification")) == ["1", "2", "10"]


def test_class_label_feature_names_win():
    ds = datasets.Dataset.from_dict(
        {"text": ["a", "b"], "label": [0, 1]},
        features=datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])}),
    )
    assert resolve_label_names(ds, _section(), get_task("classification")) == ["no", "yes"]
    encoded = encode_labels(ds, _section(), get_task("classification"), ["no", "yes"], "train")
    assert encoded["labels"] == [0, 1]


def test_multi_label_strings_of_ids_map_to_given_names():
    section = _section(label_names=["anger", "joy", "fear"])
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["0,2", "1"]})
    encoded = encode_labels(ds, section, get_task("multi_label"), section.label_names, "train")
    assert encoded["labels"] == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    bad = datasets.Dataset.from_dict({"text": ["a"], "label": ["0,7"]})
    with pytest.raises(DataError, match=r"\['7'\]; allowed: one of \['anger', 'joy', 'fear'\] or an id 0..2"):
        encode_labels(bad, section, get_task("multi_label"), section.label_names, "train")


def test_multi_label_lists_of_names_are_discovered():
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [["joy", "anger"], []]})
    names = resolve_label_names(ds, _section(), get_task("multi_label"))
    assert names == ["anger", "joy"]
    assert encode_labels(ds, _section(), get_task("multi_label"), names, "train")["labels"] == [[1.0, 1.0], [0.0, 0.0]]


def test_regression_refuses_non_numbers():
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["0.5", "high"]})
    with pytest.raises(DataError, match=r"\['high'\]; allowed: a number"):
        encode_labels(ds, _section(), get_task("regression"), None, "train")


def test_carved_validation_split_is_seeded_and_stratified(tiny_checkpoints):
    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], "pair"))
    task = get_task("classification")
    from finetune.data.loading import load_raw

    raw = load_raw(recipe.data)
    names = resolve_label_names(raw["train"], recipe.data, task)
    train1, eval1, _ = make_splits(raw, recipe, task, names)
    train2, eval2, _ = make_splits(raw, recipe, task, names)
    assert eval1["sentence1"] == eval2["sentence1"]
    assert len(eval1) == 40 and len(train1) == 120
    share = sum(eval1["labels"]) / len(eval1)
    assert abs(share - sum(train1["labels"]) / len(train1)) < 0.05
    recipe.training.seed = 7
    _, eval3, _ = make_splits(raw, recipe, task, names)
    assert eval3["sentence1"] != eval1["sentence1"]


def test_tokenisation_is_cached_and_keyed_by_settings(tiny_checkpoints):
    from transformers import AutoTokenizer

    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["bert"])
    task = get_task("classification")
    first = prepare(recipe, task, tokenizer)
    second = prepare(recipe, task, tokenizer)
    assert not first.cache_hit and second.cache_hit
    assert first.train["input_ids"] == second.train["input_ids"]
    assert max(len(x) for x in first.train["input_ids"]) <= 64
    recipe.model.max_length = 16
    third = prepare(recipe, task, tokenizer)
    assert not third.cache_hit
    assert max(len(x) for x in third.train["input_ids"]) == 16
