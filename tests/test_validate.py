"""`finetune validate`: broken recipes are refused before training, with messages naming the field."""

from __future__ import annotations

import pytest

from finetune.cli import main
from tests.conftest import DATA, tiny_recipe, write_recipe


def _validate(tmp_path, recipe: dict, capsys, *overrides: str) -> tuple[int, str]:
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code = main(["validate", str(path), *overrides])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_good_recipe_reports_labels_and_lengths(tiny_checkpoints, tmp_path, capsys):
    code, out = _validate(tmp_path, tiny_recipe(tiny_checkpoints["bert"]), capsys)
    assert code == 0, out
    assert "labels (2): negative, positive" in out
    assert "train label counts: {'negative':" in out
    assert "truncated at max_length 64" in out
    assert "eval tokens: p50" in out


def test_lengths_read_a_slice_at_a_time_match_lengths_read_at_once(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    from finetune.data import features

    reports = []
    for size in (100_000, 7):  # all rows in one slice; slices of 7 (the sample has more rows, not a multiple of 7)
        monkeypatch.setattr(features, "LENGTH_SLICE", size)
        code, out = _validate(tmp_path, tiny_recipe(tiny_checkpoints["bert"]), capsys)
        assert code == 0, out
        reports.append([line for line in out.splitlines() if "tokens: p50" in line])
    assert reports[0] and reports[0] == reports[1]


def test_truncation_share_is_reported(tiny_checkpoints, tmp_path, capsys):
    code, out = _validate(tmp_path, tiny_recipe(tiny_checkpoints["bert"]), capsys, "model.max_length=8")
    assert code == 0
    share = float(out.split("% truncated at max_length 8")[0].rsplit(" ", 1)[-1])
    assert share > 50


@pytest.mark.parametrize(
    "kind,change,expected",
    [
        ("unknown key", {"training": {"lerning_rate": 1e-4}}, "training.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
        ("wrong type", {"training": {"num_epochs": "three"}}, "training.num_epochs: Input should be a valid number"),
        ("unknown task", {"task": {"type": "translation"}}, "task.type: Input should be 'classification', 'regression', 'multi_label', 'token_classification', 'question_answering' or 'multiple_choice' (got \"translation\")"),
        ("missing column", {"data": {"text_column": "review"}}, "data.text_column: column 'review' is not in split 'train'; columns found: sentence, label"),
        ("bad label values", {"data": {"label_names": ["a", "b", "c"], "label_column": "sentence"}},
         "data.label_column: "),
        ("too few labels", {"data": {"label_names": None, "label_column": "sentence", "max_train_samples": 1}},
         "cannot be used as classification labels"),
        ("missing file", {"data": {"files": {"train": "nowhere.csv"}}}, "data.files.train: file not found: nowhere.csv"),
        ("unknown file type", {"data": {"files": {"train": str(DATA / "sst2" / "SOURCE.md")}}}, "data.files.train: "),
        ("metric of another task", {"task": {"type": "classification", "metric_for_best": "pearson"}},
         "allowed: accuracy, f1_macro"),
        ("missing checkpoint", {"model": {"checkpoint": "./no/such/dir"}}, "model.checkpoint: './no/such/dir' looks like a directory but does not exist"),
        ("unreachable hub checkpoint", {"model": {"checkpoint": "org/not-a-model"}}, "model.checkpoint: cannot find 'org/not-a-model'"),
        ("max_length beyond positions", {"model": {"max_length": 1024}}, "model.max_length: 1024 is longer than the checkpoint's 512 positions"),
        ("BigBird setting on BERT", {"model": {"attention_type": "block_sparse"}}, "model.attention_type: 'block_sparse' applies only to BigBird checkpoints"),
    ],
)
def test_broken_recipes_are_refused_naming_the_field(tiny_checkpoints, tmp_path, capsys, kind, change, expected):
    recipe = tiny_recipe(tiny_checkpoints["bert"], **change)
    if "checkpoint" not in change.get("model", {}):
        recipe["model"]["checkpoint"] = str(tiny_checkpoints["bert"])
    code, out = _validate(tmp_path, recipe, capsys)
    assert code != 0, f"{kind}: accepted\n{out}"
    assert expected in out, f"{kind}: message was\n{out}"


@pytest.mark.parametrize(
    "model,expected",
    [
        ({"max_length": 128}, "model.attention_type: BigBird recipes must state it; allowed: block_sparse, original_full"),
        ({"max_length": 64, "attention_type": "block_sparse"}, "model.max_length: 64 is too short for block_sparse attention with block_size 8 and num_random_blocks 2; allowed: at least 73"),
        ({"max_length": 100, "attention_type": "block_sparse"}, "model.max_length: 100 is not a multiple of block_size 8"),
        # the block layout comes from the checkpoint here, so the rule is checked against it
        ({"max_length": 128, "attention_type": "block_sparse", "sparse_attention_min_length": 64},
         "model.sparse_attention_min_length: 64 is below the 73 tokens block-sparse attention needs with block_size 8 "
         "and num_random_blocks 2; allowed: at least 73"),
        ({"max_length": 128, "attention_type": "block_sparse", "sparse_attention_min_length": 200},
         "model.sparse_attention_min_length: 200 is longer than model.max_length 128, so no batch would use block_sparse"),
    ],
)
def test_impossible_bigbird_settings(tiny_checkpoints, tmp_path, capsys, model, expected):
    recipe = tiny_recipe(tiny_checkpoints["big_bird"], model={"checkpoint": str(tiny_checkpoints["big_bird"]), **model})
    code, out = _validate(tmp_path, recipe, capsys)
    assert code != 0
    assert expected in out, out


def test_unreachable_checkpoint_still_checks_the_data(tmp_path, capsys, tiny_checkpoints):
    recipe = tiny_recipe(tiny_checkpoints["bert"], model={"checkpoint": "org/not-a-model"}, data={"text_column": "review"})
    code, out = _validate(tmp_path, recipe, capsys)
    assert code != 0
    assert "cannot find 'org/not-a-model'" in out and "column 'review' is not in split" in out
    assert "2 problem(s)" in out


@pytest.mark.no_store
def test_run_refuses_before_training(tiny_checkpoints, tmp_path, capsys):
    recipe = tiny_recipe(tiny_checkpoints["big_bird"], model={"checkpoint": str(tiny_checkpoints["big_bird"])})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.attention_type" in err
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run may start for a recipe that cannot train"


def test_pickle_only_checkpoints_are_refused_unless_allowed(tiny_checkpoints, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoints["bert"], pickled)
    weights = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    recipe = tiny_recipe(pickled)
    code, out = _validate(tmp_path, recipe, capsys)
    assert code != 0
    assert "has only pickle weights (pytorch_model.bin)" in out and "model.allow_pickle: true" in out
    code, out = _validate(tmp_path, recipe, capsys, "model.allow_pickle=true")
    assert code == 0, out


def test_remote_code_stays_off_by_default():
    from finetune.config.recipe import ModelSection

    assert ModelSection(checkpoint="x").trust_remote_code is False
    assert ModelSection(checkpoint="x").allow_pickle is False


def test_every_missing_file_and_column_is_named_at_once(tiny_checkpoints, tmp_path, capsys):
    recipe = tiny_recipe(tiny_checkpoints["bert"], data={"files": {"train": ["a.tsv", str(DATA / "sst2" / "train.tsv"),
                                                                             "b.tsv"], "validation": "c.tsv"}})
    code, out = _validate(tmp_path, recipe, capsys)
    assert code != 0
    for name in ("a.tsv", "b.tsv", "c.tsv"):
        assert f"file not found: {name}" in out, out
    assert "3 problem(s)" in out
    assert "# resolved recipe" in out, "validate shows the resolved recipe"

    columns = tiny_recipe(tiny_checkpoints["bert"], data={"text_column": "review", "label_column": "stars"})
    code, out = _validate(tmp_path, columns, capsys)
    assert "data.text_column: column 'review' is not in split 'train'; columns found: sentence, label (nor in split 'validation')" in out
    assert "data.label_column: column 'stars' is not in split 'train'" in out and "2 problem(s)" in out


@pytest.mark.no_store
def test_run_names_every_missing_file_before_printing_or_starting_anything(tiny_checkpoints, tmp_path, capsys):
    recipe = tiny_recipe(tiny_checkpoints["bert"], output_dir=str(tmp_path / "out"),
                         data={"files": {"train": "nowhere.tsv", "validation": "neither.tsv"}})
    code = main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))])
    captured = capsys.readouterr()
    assert code == 2
    assert "2 problems with the data" in captured.err
    assert "data.files.train: file not found: nowhere.tsv" in captured.err
    assert "data.files.validation: file not found: neither.tsv" in captured.err
    assert captured.out == "", "nothing is printed before the check"
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


# --- what the checkpoint's family can do, said before anything trains (issue: model families) ------------------

def test_a_task_the_family_has_no_head_for_is_refused_with_the_reason(tiny_checkpoints, tmp_path, capsys):
    code, out = _validate(tmp_path, tiny_recipe(tiny_checkpoints["eurobert"], "question_answering"), capsys)
    assert code == 1
    assert "task.type question_answering: transformers has no question-answering head for eurobert checkpoints" in out
    assert "family eurobert" in out


def test_positions_past_robertas_offset_and_missing_lora_targets_are_refused(tiny_checkpoints, tmp_path, capsys):
    code, out = _validate(tmp_path, tiny_recipe(tiny_checkpoints["roberta"]), capsys, "model.max_length=513")
    assert code == 1 and "model.max_length: 513 is longer than the checkpoint's 512 positions" in out
    code, out = _validate(tmp_path, tiny_recipe(tiny_checkpoints["modernbert"]), capsys,
                          "model.adapter.target_modules=[query,value]")
    assert code == 1 and "model.adapter.target_modules: the model has no linear layer named query, value" in out
    assert "Wqkv" in out  # the ones it has, to choose from
    code, out = _validate(tmp_path, tiny_recipe(tiny_checkpoints["modernbert"]), capsys, "model.adapter.r=4")
    assert code == 0, out  # the family's default (Wqkv) exists


def test_a_model_type_no_family_covers_is_validated_with_what_it_offers(tiny_checkpoints, tmp_path, capsys):
    import shutil

    import transformers

    folder = tmp_path / "mpnet"
    config = transformers.MPNetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=transformers.AutoTokenizer.from_pretrained(tiny_checkpoints["bert"]).vocab_size,
                                      max_position_embeddings=514)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoints["bert"] / name, folder / name)
    code, out = _validate(tmp_path, tiny_recipe(folder), capsys)
    assert code == 0, out
    assert "note: mpnet is not one of the families finetune knows" in out
    assert "yes  training.freeze N, training.layer_lr_decay" in out
    assert "yes  tasks classification, regression, multi_label, token_classification" in out
    assert "no   model.adapter (LoRA) with default targets: no default LoRA targets for mpnet" in out
    code, out = _validate(tmp_path, tiny_recipe(folder), capsys, "model.adapter.r=4", "model.pooling=mean")
    assert code == 1
    assert "model.adapter.target_modules: no default LoRA targets for mpnet: name the linear layers" in out
    assert "model.pooling: mean: finetune has no family module for mpnet" in out


def test_a_run_refused_after_its_folder_was_made_can_be_run_again_corrected(tiny_checkpoints, tmp_path):
    """A refusal must not leave files that make the corrected rerun refuse the folder as not finetune's."""
    from finetune.config.recipe import Recipe
    from finetune.errors import DataError
    from finetune.training import train

    out = tmp_path / "out"
    bad = tiny_recipe(tiny_checkpoints["bert"], output_dir=str(out), data={"label_column": "sentence"})
    with pytest.raises(DataError):  # found once the data loads, after the output folder was made
        train.main(Recipe.model_validate(bad))
    assert out.is_dir() and not (out / "recipe.yaml").exists()
    good = tiny_recipe(tiny_checkpoints["bert"], output_dir=str(out), training={"max_steps": 2})
    assert train.main(Recipe.model_validate(good)).steps == 2
