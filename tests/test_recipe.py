"""Recipe schema, files, defaults and overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from finetune.cli import build_parser
from finetune.config.recipe import Recipe, RecipeError, describe_fields, flatten, load_recipe
from tests.conftest import ROOT, write_recipe

SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.name for p in SHIPPED}
    for expected in ["quickstart.yaml", "sst2-distilbert.yaml", "agnews-bert.yaml", "mrpc-bert.yaml", "stsb-bert.yaml",
                     "goemotions-distilbert.yaml", "bigbird-long.yaml"]:
        assert expected in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_parses_and_starts_with_its_command(path: Path):
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(ROOT)
    if path.parent.name == "base":
        assert first.startswith("# base recipe"), f"{rel}: base recipes say so on their first line"
        return
    assert first == f"# finetune run {rel}", f"{rel}: the first line must be the exact command that runs it"
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.output_dir == f"runs/{path.stem}"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_and_start_with_their_command(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    rel = path.relative_to(ROOT)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"accelerate launch --config_file {rel}" in first and "-m finetune run" in first
    config = load_config_from_file(str(path))
    assert config.num_processes >= 2


def _base(tmp_path: Path) -> dict:
    return {
        "model": {"checkpoint": "bert-base-uncased"},
        "data": {"files": {"train": "train.csv"}},
        "task": {"type": "classification"},
    }


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", _base(tmp_path))
    recipe = load_recipe(
        path,
        [
            "training.learning_rate=3e-5",
            "training.max_steps=50",
            "model.trust_remote_code=false",
            "data.label_names=[neg, pos]",
            "data.files.validation=dev.csv",
            "training.max_grad_norm=null",
            "task.metric_for_best=f1_macro",
        ],
    )
    assert recipe.training.learning_rate == 3e-5 and isinstance(recipe.training.learning_rate, float)
    assert recipe.training.max_steps == 50 and isinstance(recipe.training.max_steps, int)
    assert recipe.model.trust_remote_code is False
    assert recipe.data.label_names == ["neg", "pos"]
    assert recipe.data.files == {"train": "train.csv", "validation": "dev.csv"}
    assert recipe.training.max_grad_norm is None
    assert recipe.task.metric_for_best == "f1_macro"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("training.learnig_rate=1e-5", "did you mean training.learning_rate"),
        ("trainig.seed=1", "keys allowed in the recipe"),
        ("training.max_steps=ten", "training.max_steps"),
        ("model.trust_remote_code=maybe", "model.trust_remote_code"),
        ("training.scheduler=exponential", "'linear', 'cosine' or 'constant'"),
        ("training=3", "is a section"),
        ("training.seed", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, override, expected):
    path = write_recipe(tmp_path / "r.yaml", _base(tmp_path))
    with pytest.raises(RecipeError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(path, [override])


def test_defaults_merge_deeply_and_later_files_win(tmp_path):
    write_recipe(tmp_path / "base.yaml", {**_base(tmp_path), "training": {"seed": 1, "learning_rate": 1e-4}})
    child = write_recipe(tmp_path / "child.yaml", {"defaults": ["base.yaml"], "training": {"seed": 7}})
    recipe = load_recipe(child)
    assert recipe.training.seed == 7
    assert recipe.training.learning_rate == 1e-4
    assert recipe.model.checkpoint == "bert-base-uncased"
    assert recipe.name == "child"


def test_defaults_cycle_is_reported(tmp_path):
    write_recipe(tmp_path / "a.yaml", {"defaults": ["b.yaml"]})
    write_recipe(tmp_path / "b.yaml", {"defaults": ["a.yaml"]})
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize("defaults,expected", [
    ("", "`defaults` must be a list of recipe file names"),  # found by the property test: '' named the folder
    (["sub"], "is a directory; a recipe is a YAML file"),
])
def test_defaults_naming_no_file_are_refused_by_name(tmp_path, defaults, expected):
    (tmp_path / "sub").mkdir()
    child = write_recipe(tmp_path / "child.yaml", {"defaults": defaults})
    with pytest.raises(RecipeError, match=expected):
        load_recipe(child)


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"training": {"learnign_rate": 1}}, "training.learnign_rate: unknown key (did you mean 'learning_rate'?)"),
        ({"task": {"type": "summarization"}}, "task.type: Input should be 'classification', 'regression', 'multi_label', 'token_classification', 'question_answering' or 'multiple_choice'"),
        ({"training": {"batch_size": "big"}}, 'training.batch_size: Input should be a valid integer'),
        ({"task": {"type": "regression", "metric_for_best": "accuracy"}}, "allowed: pearson, spearman, mse, mae, r2"),
        ({"data": {"dataset": "glue", "files": {"train": "x.csv"}}}, "give exactly one of data.dataset"),
        ({"training": {"eval_strategy": "steps"}}, "training.eval_steps is required"),
    ],
)
def test_schema_errors_name_field_and_allowed_values(tmp_path, change, expected):
    data = _base(tmp_path)
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    path = write_recipe(tmp_path / "r.yaml", data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert expected in str(info.value)


def test_yaml_is_data_not_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_help_lists_every_field_with_its_docstring():
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for line in describe_fields():
        key = line.strip().split(" ")[0]
        assert key.rstrip(":") in help_text
    assert "Peak learning rate of AdamW" in help_text


def test_cli_rejects_stray_flags(capsys):
    from finetune.cli import main

    with pytest.raises(SystemExit) as info:
        main(["run", "recipes/quickstart.yaml", "--learning-rate", "3"])
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_flatten_keeps_every_key():
    recipe = Recipe.model_validate(
        {"model": {"checkpoint": "x"}, "data": {"dataset": "glue"}, "task": {"type": "classification"}}
    )
    flat = flatten(recipe.model_dump(mode="json"))
    assert flat["training.learning_rate"] == 5e-5
    assert flat["data.files"] is None
    assert "model.checkpoint" in flat and "output_dir" in flat


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "offline").glob("*.yaml")), ids=lambda p: p.name)
def test_offline_recipes_say_what_their_data_is_and_which_recipe_runs_online(path):
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "../shared/data" in header and "beside the repository" in header, header
    twins = re.findall(r"recipes/([\w-]+\.yaml)", header.split("Online", 1)[-1])
    assert twins and all((ROOT / "recipes" / twin).is_file() for twin in twins), header
