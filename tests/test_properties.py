"""Property-based tests: no recipe file and no request body can produce a traceback or a 5xx."""

from __future__ import annotations


import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from finetune.config.recipe import RecipeError, load_recipe, parse_override

KEYS = ["model", "data", "task", "training", "tracking", "output_dir", "name", "defaults", "checkpoint", "learning_rate",
        "type", "files", "max_length", "seed", "label_names", "eval_strategy", "attention_type", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["classification", "block_sparse", "steps", "1e-5"]))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=6)),
    max_leaves=25,
)
VALID = {"model": {"checkpoint": "bert-base-uncased"}, "data": {"files": {"train": "t.csv"}}, "task": {"type": "classification"}}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
@example({"defaults": "\x00"})  # found on 2026-12-01: a raw "embedded null byte" ValueError
@example({"defaults": ["a\x00b.yaml"]})
@example({"defaults": ""})  # found on 2026-11-30: '' named the recipe's own folder
@example({"defaults": ["."]})
@example({"defaults": ["/etc/passwd"]})
def test_any_yaml_document_gives_a_recipe_or_a_named_error(tmp_path, document):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_recipe(path)
    except RecipeError as e:
        assert str(e).strip()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["model", "data", "task", "training", "tracking"]),
                       st.dictionaries(st.sampled_from(KEYS + ["batch_size", "num_epochs", "threshold", "quoting"]), scalars,
                                       max_size=3), max_size=3))
def test_random_field_values_on_a_valid_recipe(tmp_path, changes):
    document = {k: dict(v) for k, v in VALID.items()}
    for section, values in changes.items():
        document[section] = {**document.get(section, {}), **values}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_recipe(path)
    except RecipeError as e:
        # The message names a field of the recipe.
        assert any(f"{section}." in str(e) or "data." in str(e) for section in document), str(e)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_override_string_parses_or_says_why(text):
    try:
        parse_override(text)
    except RecipeError as e:
        assert str(e).strip()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_overrides_on_top_of_a_valid_recipe(tmp_path, overrides):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(VALID))
    try:
        load_recipe(path, [f"training.{o}" if "=" in o else o for o in overrides])
    except RecipeError as e:
        assert str(e).strip()
