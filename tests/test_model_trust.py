"""A model folder's own metadata is not trusted (issue 33, classes 6, 8 and 4): finetune.json is covered by the
checksums and cross-checked against config.json, adapter configs are checked before peft builds anything, and every
JSON/YAML a model folder holds is read bounded."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from finetune.errors import CheckpointError, DataError, ModelSourceError
from finetune.models.checksums import read_manifest, write_manifest
from finetune.models.modeling import MANIFEST_FILE, ModelInfo, build_model, read_model_info, save_model_dir
from finetune.models.pretrained import resolve_checkpoint
from finetune.tasks import get_task

TEXT = "a gripping, beautiful film"
LABELS = ["negative", "positive"]


def _tiny_classifier(tiny_checkpoints):
    """A tiny BERT with a fresh two-label head (seeded), and its tokenizer."""
    from finetune.config.recipe import ModelSection

    checkpoint = str(tiny_checkpoints["bert"])
    torch.manual_seed(0)
    return build_model(resolve_checkpoint(checkpoint), ModelSection(checkpoint=checkpoint),
                       get_task("classification"), LABELS)


@pytest.fixture(scope="module")
def saved(tiny_checkpoints, tmp_path_factory) -> Path:
    model, tokenizer = _tiny_classifier(tiny_checkpoints)
    info = ModelInfo(task="classification", label_names=LABELS, text_pair=False, max_length=64)
    return save_model_dir(tmp_path_factory.mktemp("trust") / "best", model, tokenizer, info,
                          "name: tiny\ndata:\n  text_column: sentence\n")


@pytest.fixture(scope="module")
def adapter_saved(tiny_checkpoints, tmp_path_factory) -> Path:
    from finetune.config.recipe import AdapterSection
    from finetune.models.adapters import add_adapter, adapter_settings, base_reference, weights_digest

    checkpoint = str(tiny_checkpoints["bert"])
    model, tokenizer = _tiny_classifier(tiny_checkpoints)
    digest = weights_digest(model)
    cfg = AdapterSection(r=4)
    model = add_adapter(model, cfg)
    info = ModelInfo(task="classification", label_names=LABELS, text_pair=False, max_length=64,
                     adapter=adapter_settings(model, cfg, base_reference(checkpoint, None, Path(checkpoint), "local",
                                                                         digest)))
    return save_model_dir(tmp_path_factory.mktemp("trust-adapter") / "best", model, tokenizer, info, "name: a\n")


def _load(folder: Path):
    from finetune.models.predictor import Predictor

    return Predictor.from_dir(folder)


def _edit_json(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def _reseal(folder: Path) -> None:
    """Record the folder's files as they are now, as if it had been saved that way: so the check under test is the
    one that refuses, not the checksums."""
    write_manifest(folder, list(read_manifest(folder, MANIFEST_FILE)), MANIFEST_FILE)


def _copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return shutil.copytree(folder, tmp_path / name)


# --- class 6: finetune.json is covered by the checksums ------------------------------------------------------


def test_the_manifest_lists_finetune_json(saved):
    listed = read_manifest(saved, MANIFEST_FILE)
    assert {"finetune.json", "config.json", "model.safetensors"} <= set(listed) and "recipe.yaml" not in listed
    assert read_model_info(saved).manifest == MANIFEST_FILE


@pytest.mark.parametrize("edit", ["labels renamed", "labels swapped", "max_length raised", "threshold changed"])
def test_an_edited_finetune_json_is_refused_by_its_checksum(saved, tmp_path, edit):
    folder = _copy(saved, tmp_path)
    changes = {"labels renamed": lambda v: v.update(label_names=["bad", "good"]),
               "labels swapped": lambda v: v.update(label_names=LABELS[::-1]),
               "max_length raised": lambda v: v.update(max_length=100),
               "threshold changed": lambda v: v["settings"].update(threshold=0.9)}
    _edit_json(folder / "finetune.json", changes[edit])
    with pytest.raises(CheckpointError, match=r"finetune.json (is \d+ bytes, \d+ were written|does not match the sha256 checksum)"):
        _load(folder)


def test_a_deleted_manifest_is_refused_not_loaded_unverified(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="checksums.json: missing, though finetune.json says"):
        _load(folder)


def test_a_manifest_without_finetune_json_loads_with_a_warning(saved, tmp_path, caplog):
    folder = _copy(saved, tmp_path)
    listed = read_manifest(folder, MANIFEST_FILE)
    write_manifest(folder, [rel for rel in listed if rel != "finetune.json"], MANIFEST_FILE)
    with caplog.at_level("WARNING", logger="finetune"):
        checked = __import__("finetune.models.integrity", fromlist=["x"]).check_model_folder(folder)
    assert checked.unverified and "finetune.json is not listed" in caplog.text


def test_calibration_rewriting_finetune_json_keeps_the_folder_loadable(saved, tmp_path):
    from dataclasses import replace

    from finetune.models.modeling import write_model_info

    folder = _copy(saved, tmp_path)
    info = read_model_info(folder)
    write_model_info(folder, replace(info, settings={"temperature": 1.5}))
    assert _load(folder).info.task_settings.temperature == 1.5  # the manifest was updated with the new file


# --- class 6: cross-checked against config.json (even when the checksums agree, or there are none) ----------


def _swap_config_labels(folder: Path) -> None:
    _edit_json(folder / "config.json", lambda v: v.update(id2label={"0": "positive", "1": "negative"},
                                                         label2id={"positive": 0, "negative": 1}))


MISMATCHES = {
    "labels swapped in config.json": (_swap_config_labels, r"label_names \['negative', 'positive'\] are not "
                                                           r"config.json's id2label \['positive', 'negative'\]"),
    "a label added": (lambda f: _edit_json(f / "finetune.json", lambda v: v["label_names"].append("neutral")),
                      "num_labels 2"),
    "a label dropped": (lambda f: _edit_json(f / "finetune.json", lambda v: v.update(label_names=["negative"])),
                        "num_labels 2"),
    "max_length beyond the positions": (lambda f: _edit_json(f / "finetune.json", lambda v: v.update(max_length=4096)),
                                        r"max_length 4096 is more than the \d+ positions"),
    "another task": (lambda f: _edit_json(f / "finetune.json", lambda v: v.update(task="token_classification")),
                     "architecture is BertForSequenceClassification, but finetune.json says task token_classification"),
    "regression on a classifier": (lambda f: _edit_json(f / "finetune.json",
                                                        lambda v: v.update(task="regression", label_names=None)),
                                   "problem_type is 'single_label_classification', but task regression"),
}


@pytest.mark.parametrize("sealed", [True, False], ids=["checksums agree", "saved before checksums"])
@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_metadata_that_does_not_fit_config_json_is_refused_at_load(saved, tmp_path, mismatch, sealed):
    folder = _copy(saved, tmp_path)
    edit, named = MISMATCHES[mismatch]
    edit(folder)
    if sealed:
        _reseal(folder)
    else:
        (folder / MANIFEST_FILE).unlink()
        _edit_json(folder / "finetune.json", lambda v: v.pop("manifest"))
    with pytest.raises(CheckpointError, match=named):
        _load(folder)


BAD_FIELDS = {
    "label_names a text": ({"label_names": "negative,positive"}, "label_names must be a list"),
    "a label twice": ({"label_names": ["negative", "negative"]}, "names 'negative' more than once"),
    "max_length a text": ({"max_length": "64"}, "max_length must be a whole number"),
    "max_length zero": ({"max_length": 0}, "max_length must be a whole number"),
    "text_pair a text": ({"text_pair": "no"}, "text_pair must be true or false"),
    "threshold out of range": ({"settings": {"threshold": 5}}, "settings: "),
    "unknown task": ({"task": "<script>"}, "task '<script>' is not one this finetune knows"),
    "not an object": ([1, 2], "a JSON object is expected"),
}


@pytest.mark.parametrize("field", BAD_FIELDS)
def test_finetune_json_fields_of_the_wrong_kind_are_named(saved, tmp_path, field):
    folder = _copy(saved, tmp_path)
    values, named = BAD_FIELDS[field]
    if isinstance(values, dict):
        _edit_json(folder / "finetune.json", lambda v: v.update(values))
    else:
        (folder / "finetune.json").write_text(json.dumps(values))
    _reseal(folder)
    with pytest.raises(CheckpointError, match=named):
        _load(folder)


def test_the_server_and_the_mlflow_model_refuse_edited_metadata_too(saved, tmp_path):
    from finetune.tracking.mlflow_model import predictor_from_data
    from serving.loading import load_model
    from tests.test_integrity import _as_mlflow_data

    folder = _copy(saved, tmp_path)
    _swap_config_labels(folder)
    _reseal(folder)
    with pytest.raises(CheckpointError, match="are not config.json's id2label"):
        load_model(str(folder))

    root = _as_mlflow_data(_copy(saved, tmp_path, "unchanged"))
    assert "finetune.json" in read_manifest(root, MANIFEST_FILE)
    assert predictor_from_data(root).predict([TEXT])[0]["label"] in LABELS
    _edit_json(root / "finetune.json", lambda v: v.update(label_names=LABELS[::-1]))
    with pytest.raises(CheckpointError, match=r"finetune.json (is \d+ bytes|does not match)"):
        predictor_from_data(root)


# --- class 4: every JSON/YAML of a model folder is read bounded ---------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def test_a_model_folders_recipe_alias_bomb_is_refused_quickly(saved, tmp_path):
    from finetune.evaluation.data import trained_columns

    folder = _copy(saved, tmp_path)
    assert trained_columns(folder, None) == {"data.text_column": "sentence"} or trained_columns(folder, None)
    (folder / "recipe.yaml").write_text(BOMB + "data:\n  text_column: t\n")
    started = time.monotonic()
    with pytest.raises(DataError, match="recipe.yaml: the model's recipe is refused .*expands to more than"):
        trained_columns(folder, None)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("file", ["finetune.json", "config.json", "checksums.json"])
@pytest.mark.parametrize("shape", ["too large", "too deep"])
def test_oversized_or_deep_model_folder_json_is_refused_naming_the_file(saved, tmp_path, file, shape):
    folder = _copy(saved, tmp_path)
    if file != "checksums.json":  # so the bounded reader refuses it, not the recorded size
        (folder / MANIFEST_FILE).unlink()
        _edit_json(folder / "finetune.json", lambda v: v.pop("manifest"))
    text = ('{"pad": "' + "x" * 2_000_000 + '"}') if shape == "too large" else ("[" * 5000 + "]" * 5000)
    (folder / file).write_text(text)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"{file}.*(at most 1000000|nests deeper than 64 levels)"):
        _load(folder)
    assert time.monotonic() - started < 5


def test_an_mlmodel_alias_bomb_is_refused_before_mlflow_reads_it(tmp_path):
    from finetune.tracking.mlflow_model import data_folder

    (tmp_path / "MLmodel").write_text(BOMB + "flavors: {}\n")
    started = time.monotonic()
    with pytest.raises(ModelSourceError, match="not a readable MLflow model .*expands to more than"):
        data_folder(tmp_path)
    assert time.monotonic() - started < 5
    (tmp_path / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: finetune.tracking.mlflow_model\n    data: ../../etc\n")
    with pytest.raises(ModelSourceError, match="outside the model folder"):
        data_folder(tmp_path)


def test_training_state_and_marker_json_are_read_bounded(tmp_path):
    from safetensors.torch import save_file

    from finetune.training import outputs
    from finetune.training import state as training_state

    out = tmp_path / "out"
    outputs.claim(out, "r", "h")
    (out / outputs.MARKER_FILE).write_text('{"created_by": "finetune", "pad": "' + "x" * 200_000 + '"}')
    assert outputs.read_marker(out) is None  # too large to be one finetune wrote: not trusted, no crash
    step = out / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    for name in training_state.REQUIRED_FILES:
        if name.endswith(".safetensors"):
            save_file({}, str(step / name))
        else:
            (step / name).write_text("{}")
    (step / training_state.STATE_FILE).write_text("[" * 5000 + "]" * 5000)
    assert "trainer_state.json is unreadable" in training_state.checkpoint_problem(step)


# --- class 8: adapter configs are checked before peft builds anything ----------------------------------------


def test_the_adapter_model_loads_as_saved(adapter_saved):
    assert _load(adapter_saved).predict([TEXT])[0]["label"] in LABELS


ADAPTER_EDITS = {
    "a huge rank": ({"r": 20000}, r"r 20000: a whole number from 1 to 1024"),
    "layer_replication": ({"layer_replication": [[0, 2], [0, 2]]}, "layer_replication is .* finetune never sets it"),
    "another adapter type": ({"peft_type": "LOHA"}, "peft_type 'LOHA': finetune makes and loads LORA adapters only"),
    "DoRA": ({"use_dora": True}, "use_dora is True"),
    "a field peft does not know": ({"rope_hack": 3}, "rope_hack is 3 \\(a field this peft does not know\\)"),
    "a huge alpha": ({"lora_alpha": 1e9}, "lora_alpha 1000000000.0: a number above 0, at most 4096"),
    "a regex of targets": ({"target_modules": ".*"}, "target_modules must be a list of module names"),
    "a target the base lacks": ({"target_modules": ["query", "nonexistent"]},
                                "(target_modules names nonexistent|disagrees with finetune.json)"),
    "no head saved": ({"modules_to_save": ["pooler"]}, r"head \['pooler'\] disagrees with finetune.json"),
    "a rank finetune.json does not say": ({"r": 8}, "r 8 disagrees with finetune.json's adapter.r 4"),
    "another task's head": ({"auto_mapping": {"base_model_class": "BertForTokenClassification"}},
                            "is not a SequenceClassification model"),
}


@pytest.mark.parametrize("edit", ADAPTER_EDITS)
def test_an_adapter_config_beyond_what_finetune_writes_is_refused_before_peft(adapter_saved, tmp_path, edit,
                                                                               monkeypatch):
    import peft

    folder = _copy(adapter_saved, tmp_path)
    values, named = ADAPTER_EDITS[edit]
    _edit_json(folder / "adapter_config.json", lambda v: v.update(values))
    _reseal(folder)

    def never(*args, **kwargs):
        raise AssertionError("peft built the adapter before the config was checked")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", never)
    with pytest.raises(CheckpointError, match=named):
        _load(folder)


def test_adapter_modules_the_base_lacks_or_a_head_left_out_are_named(adapter_saved, tmp_path):
    # adapter_config.json and finetune.json agree with each other (edited alike), but not with the base model.
    folder = _copy(adapter_saved, tmp_path, "targets")
    _edit_json(folder / "adapter_config.json", lambda v: v.update(target_modules=["query", "qkv_fused"]))
    _edit_json(folder / "finetune.json", lambda v: v["adapter"].update(target_modules=["query", "qkv_fused"]))
    _reseal(folder)
    with pytest.raises(CheckpointError, match="target_modules names qkv_fused, which the base model does not have"):
        _load(folder)
    folder = _copy(adapter_saved, tmp_path, "head")
    _edit_json(folder / "adapter_config.json", lambda v: v.update(modules_to_save=["pooler"]))
    _edit_json(folder / "finetune.json", lambda v: v["adapter"].update(head=["pooler"]))
    _reseal(folder)
    with pytest.raises(CheckpointError, match=r"modules_to_save is \['pooler'\]; the task head of this model is "):
        _load(folder)


def test_missing_adapter_files_and_weights_are_named_not_a_key_error(adapter_saved, tmp_path):
    from safetensors.torch import load_file, save_file

    no_config = _copy(adapter_saved, tmp_path, "no-config")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        _load(no_config)

    no_head = _copy(adapter_saved, tmp_path, "no-head")
    weights = load_file(str(no_head / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".classifier." not in k}, str(no_head / "adapter_model.safetensors"))
    _reseal(no_head)
    with pytest.raises(CheckpointError, match="has no weights for the task head 'classifier'"):
        _load(no_head)

    wrong_rank = _copy(adapter_saved, tmp_path, "wrong-rank")
    weights = load_file(str(wrong_rank / "adapter_model.safetensors"))
    key = next(k for k in weights if ".lora_A." in k)
    weights[key] = torch.zeros(6, weights[key].shape[1])
    save_file(weights, str(wrong_rank / "adapter_model.safetensors"))
    _reseal(wrong_rank)
    with pytest.raises(CheckpointError, match=r"lora_A.weight has shape \[6, 32\], not rank 4"):
        _load(wrong_rank)

    stray = _copy(saved_full := adapter_saved, tmp_path, "stray-config")
    _edit_json(stray / "finetune.json", lambda v: v.update(adapter=None))
    _reseal(stray)
    with pytest.raises(CheckpointError, match="(adapter_config.json: present, but finetune.json names no adapter|"
                                              "model.safetensors)"):
        _load(stray)
    assert saved_full.is_dir()
