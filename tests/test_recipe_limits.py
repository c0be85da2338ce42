"""Recipe loading is bounded and quiet: alias bombs, file content in errors, numbers out of range (issue 16 items 11-12)."""

from __future__ import annotations

import time
import typing

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from finetune.cli import main as cli
from finetune.config.recipe import Recipe, RecipeError, load_recipe, parse_override

VALID = "model: {checkpoint: bert-base-uncased}\ndata: {files: {train: t.csv}}\ntask: {type: classification}\n"


def _bomb(anchor: str = "a") -> str:
    """Nine aliases of nine aliases ... : under a kilobyte, 9**9 nodes once expanded."""
    lines = [f"{anchor}0: &{anchor}0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{anchor}{i}: &{anchor}{i} [" + ", ".join([f"*{anchor}{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(f"  {line}" for line in lines)


BOMBS = {
    # in a value the schema checks (the error message used to print the expanded value)
    "value": f"bomb:\n{_bomb()}\n{VALID}training:\n  seed: *a8\n",
    # as a mapping key
    "key": f"bomb:\n{_bomb()}\n? *a8\n: 1\n{VALID}",
    # as a list of labels
    "list": f"bomb:\n{_bomb()}\n" + VALID.replace("data: {files: {train: t.csv}}",
                                                  "data: {files: {train: t.csv}, label_names: [*a8, *a8]}"),
    # merge keys, which copy the merged mappings into every mapping that merges them
    "merge keys": "bomb:\n" + "\n".join(
        ["  m0: &m0 {" + ", ".join(f"k{j}: {j}" for j in range(9)) + "}"]
        + [f"  m{i}: &m{i} " + "{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + "]}" for i in range(1, 9)]) + f"\n{VALID}",
}


@pytest.mark.parametrize("placement", BOMBS)
def test_alias_bombs_are_refused_at_once(tmp_path, placement):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS[placement])
    assert path.stat().st_size < 1500
    started = time.perf_counter()
    with pytest.raises(RecipeError, match=r"expands to more than 100000 YAML nodes") as info:
        load_recipe(path)
    assert time.perf_counter() - started < 5, "refused before anything walks the expanded document"
    assert len(str(info.value)) < 300


def test_alias_bombs_in_overrides_and_self_references_are_refused(tmp_path):
    flow = "[a, a, a, a, a, a, a, a, a]"
    for i in range(8):  # each level: a list of nine copies of the one before, in flow YAML
        flow = "[" + ", ".join([f"&x{i} {flow}"] + [f"*x{i}"] * 8) + "]"
    assert len(flow) < 1000
    with pytest.raises(RecipeError, match="expands to more than"):
        parse_override(f"data.label_names={flow}")
    path = tmp_path / "cycle.yaml"
    path.write_text(f"loop: &a [1, *a]\n{VALID}")
    with pytest.raises(RecipeError, match="refers to a node that contains it"):
        load_recipe(path)
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * 3000 + "]" * 3000 + f"\n{VALID}")
    with pytest.raises(RecipeError, match="nests deeper than 64 levels"):
        load_recipe(deep)


@pytest.mark.parametrize("text", [
    f"{VALID}tracking: {{run_name: hunter2-secret-value\n",  # an unclosed flow mapping
    f"{VALID}training:\n\tseed: hunter2-secret-value\n",  # a tab
    f"{VALID}x: !!python/object/apply:os.system [hunter2-secret-value]\n",  # a tag that would run code
    f"{VALID}x: hunter2-secret-value\x01\n",  # a control character
], ids=["unclosed", "tab", "python tag", "control character"])
def test_yaml_errors_give_the_place_but_never_the_files_content(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    place = r"\((line \d+, column \d+|character #x1 at position \d+)\)"
    with pytest.raises(RecipeError, match=rf"is not valid YAML: .*{place}") as info:
        load_recipe(path)
    assert "hunter2" not in str(info.value)


def test_values_shown_in_errors_are_cut_short(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"{VALID}training: {{seed: {'x' * 20000}}}\n")
    with pytest.raises(RecipeError, match=r"training.seed: Input should be a valid integer.*xxx\.\.\.\)") as info:
        load_recipe(path)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("section,key,value,named", [
    ("training", "seed", 2**32, "training.seed: Input should be less than or equal to 4294967295"),
    ("training", "seed", -1, "training.seed: Input should be greater than or equal to 0"),
    ("training", "num_epochs", float("inf"), "training.num_epochs: Input should be a finite number"),
    ("training", "max_grad_norm", float("nan"), "training.max_grad_norm: Input should be a finite number"),
    ("training", "num_workers", 10**6, "training.num_workers: Input should be less than or equal to 256"),
    ("training", "max_steps", 2**40, "training.max_steps: Input should be less than or equal to 2147483647"),
    ("model", "block_size", 4096, "model.block_size: 4096 is longer than model.max_length 128"),
    ("task", "n_best_size", 10**9, "task.n_best_size: Input should be less than or equal to 1000"),
])
def test_numbers_out_of_range_are_refused_by_name(tmp_path, section, key, value, named):
    document = yaml.safe_load(VALID)
    document.setdefault(section, {})[key] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert named in str(info.value)
    valid = tmp_path / "valid.yaml"
    valid.write_text(VALID)
    with pytest.raises(RecipeError) as info:  # the same from the command line
        load_recipe(valid, [f"{section}.{key}={value}"])
    assert named in str(info.value)


def _numeric_fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        inner = args[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            yield from _numeric_fields(inner, f"{prefix}{name}.")
        elif inner in (int, float):
            yield f"{prefix}{name}", inner, field.metadata, model.model_config


def test_every_numeric_field_of_the_schema_has_a_range_and_no_infinity():
    fields = list(_numeric_fields(Recipe))
    assert len(fields) > 20
    for dotted, kind, metadata, config in fields:
        lower = [m for m in metadata if isinstance(m, (annotated_types.Ge, annotated_types.Gt))]
        upper = [m for m in metadata if isinstance(m, (annotated_types.Le, annotated_types.Lt))]
        assert lower and upper, f"{dotted} has no {'lower' if not lower else 'upper'} bound"
        if kind is float:
            assert config.get("allow_inf_nan") is False, f"{dotted} accepts inf and NaN"


def test_validate_refuses_what_run_refuses(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(VALID + "training: {seed: 4294967296}\n")
    assert cli(["validate", str(path)]) == 2
    assert cli(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("training.seed: Input should be less than or equal to 4294967295") == 2
