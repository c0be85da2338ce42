"""Building a task model from a checkpoint, and the saved model folder.

A saved model is a plain Hugging Face folder (safetensors weights, tokenizer, config with
id2label/label2id) plus `finetune.json` (`ModelInfo`), which says which task definition reads its
outputs and with which settings. Everything that predicts loads it through `finetune.models.predictor`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoTokenizer

from finetune.config.recipe import ModelSection
from finetune.errors import CheckpointError
from finetune.families import family_of
from finetune.families.pooling import CONFIG_KEY as POOLING_KEY
from finetune.families.pooling import choose_pooling
from finetune.models.bigbird import RULE_ATTRIBUTE, is_block_sparse, sparse_min_length
from finetune.models.checksums import fsync_path, fsync_tree, write_manifest
from finetune.models.pretrained import ResolvedCheckpoint, check_weights_format, load_config
from finetune.tasks import Task, TaskSettings

METADATA_FILE = "finetune.json"
MANIFEST_FILE = "checksums.json"
"""Sizes and SHA-256 of the weights, config and tokenizer files, recorded when the folder is saved."""


@dataclass
class ModelInfo:
    """What travels with a saved model so it can be used without its recipe."""

    task: str
    label_names: list[str] | None
    text_pair: bool
    max_length: int
    checkpoint: str = ""
    recipe_name: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    """The recipe's task settings (`TaskSettings`) the model was trained and evaluated with."""
    pad_to_multiple_of: int = 1
    """Batches are padded to a multiple of this many tokens (`model.pad_to_multiple_of`; 1 in folders saved before it)."""
    sparse_attention_min_length: int | None = None
    """Block-sparse BigBird: the padded batch length from which batches run block-sparse (the rule it was trained with)."""
    calibration: dict[str, Any] | None = None
    """Temperature scaling fitted after training (`finetune.tasks.calibration.CalibrationReport.saved`); the temperature
    itself is in the settings, where the task reads it."""
    parent: dict[str, Any] | None = None
    """The fine-tuned model this one started from (`model.checkpoint` naming a run or model folder): its source, run,
    task and labels, and whether its head was kept."""
    adapter: dict[str, Any] | None = None
    """Adapter models (`model.adapter`): the adapter settings and the base checkpoint the adapter applies to
    (`finetune.models.adapters`); None for a full model."""

    @property
    def task_settings(self) -> TaskSettings:
        return TaskSettings.of(self.settings)

    @property
    def threshold(self) -> float:
        """Multi-label: the default score threshold (one of the task settings)."""
        return self.task_settings.threshold

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelInfo":
        """Read finetune.json; models saved before the settings held the threshold kept it beside them."""
        values = dict(values)
        if "threshold" in values:
            values["settings"] = {"threshold": values.pop("threshold")} | dict(values.get("settings") or {})
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def model_class(task: Task) -> Any:
    """The transformers Auto class for the task's head (a fixed registry: names come from task definitions, never YAML)."""
    return getattr(transformers, task.auto_model)


@dataclass
class NewWeights:
    """The weights of a built model that did not come from its checkpoint (transformers' loading report, sorted by
    what they mean to a person)."""

    head: list[str]
    """Modules of the task head: new by design, initialised at random and learned in fine-tuning."""
    encoder: list[str]
    """Encoder weights the checkpoint lacks: not expected; they start random too."""
    mismatched: list[str]
    """Weights the checkpoint has with another shape: started random instead."""


def _modules(keys) -> list[str]:
    return sorted({key.rsplit(".", 1)[0] for key in keys})


def new_weights(model: Any, loading_info: dict[str, Any]) -> NewWeights:
    """Sort transformers' `output_loading_info` into the head (outside the base model's prefix) and the rest."""
    prefix = f"{model.base_model_prefix}."
    missing = set(loading_info.get("missing_keys") or ())
    mismatched = {item[0] for item in loading_info.get("mismatched_keys") or ()}
    return NewWeights(head=_modules(k for k in missing if not k.startswith(prefix)),
                      encoder=sorted(k for k in missing if k.startswith(prefix)), mismatched=sorted(mismatched))


def build_model(resolved: ResolvedCheckpoint, model_cfg: ModelSection, task: Task, label_names: list[str] | None):
    """A pretrained encoder with a fresh head for the task (and the checkpoint's tokenizer)."""
    model, tokenizer, _ = build_task_model(resolved, model_cfg, task, label_names)
    return model, tokenizer


def build_task_model(resolved: ResolvedCheckpoint, model_cfg: ModelSection, task: Task, label_names: list[str] | None):
    """`build_model`, and which of the model's weights are new (`NewWeights`): (model, tokenizer, new weights)."""
    check_weights_format(resolved.path, model_cfg.allow_pickle)
    extra: dict[str, Any] = {}
    if task.has_label_names:
        assert label_names is not None
        extra["id2label"] = dict(enumerate(label_names))
        extra["label2id"] = {name: i for i, name in enumerate(label_names)}
    for key in ("attention_type", "block_size", "num_random_blocks"):
        if getattr(model_cfg, key) is not None:
            extra[key] = getattr(model_cfg, key)
    config = load_config(resolved, model_cfg.trust_remote_code)
    family = family_of(config)
    if model_cfg.attention_dropout is not None and family.attention_dropout_key is not None:
        extra[family.attention_dropout_key] = model_cfg.attention_dropout  # a family without one is refused earlier
    if task.pooled_head:  # the family's own pooling key, when it has one (choose_pooling does the rest)
        extra.update({k: v for k, v in family.pooling_config(config, model_cfg.pooling).items() if k != POOLING_KEY})
    if task.hf_problem_type is not None:
        extra["problem_type"] = task.hf_problem_type
    if task.num_labels(label_names) is not None:
        extra["num_labels"] = task.num_labels(label_names)
    try:
        model, loading = model_class(task).from_pretrained(
            resolved.path,
            use_safetensors=not model_cfg.allow_pickle,
            trust_remote_code=model_cfg.trust_remote_code,
            output_loading_info=True,
            **extra,
        )
    except ValueError as e:
        raise CheckpointError(
            f"model.checkpoint: {resolved.name} has no {task.auto_model.removeprefix('AutoModelFor')} head class in transformers ({e})"
        ) from None
    choose_pooling(model, task.pooled_head, model_cfg.pooling)
    task.model_loaded(model, loading, resolved.name, resolved.path)
    # Parameters the checkpoint did not have (the head, or a pooler a checkpoint lacks) were freshly initialised:
    # freezing (`training.freeze`) leaves them trainable.
    model.finetune_fresh_parameters = frozenset(loading.get("missing_keys") or ())
    if is_block_sparse(model.config):
        # On the config, so save_pretrained carries the rule to evaluation, the MLflow model and serving.
        setattr(model.config, RULE_ATTRIBUTE, sparse_min_length(model.config, model_cfg.sparse_attention_min_length))
    tokenizer = load_tokenizer(resolved.path, model_cfg.trust_remote_code)
    new = new_weights(model, loading)
    model.finetune_new_weights = new  # what the run tells a person about the weights that start random
    return model, tokenizer, new


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def make_collator(tokenizer: Any, model_config: Any, task: Task, settings: TaskSettings | None = None,
                  pad_to_multiple_of: int = 1, max_length: int | None = None) -> Any:
    """The task's collator, padding each batch to its longest example rounded up to `pad_to_multiple_of` tokens
    (`model.pad_to_multiple_of`), and to the multiple the family needs (BigBird: its block size).

    A multiple that would pad `max_length` inputs beyond the model's positions is not used (the longest then sets
    the length), so padding never asks for a position the model does not have.
    """
    multiple = pad_to_multiple_of
    family = family_of(model_config)
    positions = family.usable_positions(model_config)
    if max_length and positions and -(-max_length // multiple) * multiple > positions:
        multiple = 1
    multiple = math.lcm(multiple, family.pad_multiple(model_config))
    return task.collator(tokenizer, multiple if multiple > 1 else None, settings=settings)


def save_model_dir(target: Path, model: Any, tokenizer: Any, info: ModelInfo, recipe_yaml: str) -> Path:
    """Save a complete, loadable model folder; written beside the target, synced to disk, then renamed into place.

    The folder records the checksums of its weights, config and tokenizer files (`MANIFEST_FILE`), which every
    loader compares (`finetune.models.integrity`). The rename means a crash mid-save leaves the previous best model
    intact instead of half a new one; `recover_model_dir` finishes or undoes a save a crash interrupted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, aside = staging_dirs(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # not mkdtemp: a model folder gets the user's usual permissions (umask), not 0700
    if is_block_sparse(model.config):
        info = replace(info, sparse_attention_min_length=sparse_min_length(model.config))
    model.save_pretrained(tmp, safe_serialization=True)
    if hasattr(model, "peft_config"):
        # An adapter model saves only the adapter and the head; the task model's config keeps labels and head size.
        model.get_base_model().config.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's template card; MODEL_CARD.md is the model's
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()], MANIFEST_FILE)
    (tmp / METADATA_FILE).write_text(json.dumps(asdict(info), indent=2))
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    fsync_tree(tmp)
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(tmp, target)
    fsync_path(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def staging_dirs(target: Path) -> tuple[Path, Path]:
    """Where `save_model_dir` writes a new folder, and where it moves the old one aside during the swap."""
    return target.with_name(f".{target.name}-new"), target.with_name(f".{target.name}-old")


def recover_model_dir(target: Path) -> list[str]:
    """Finish or undo a `save_model_dir` a crash interrupted; returns what was done, for people.

    Killed between its two renames, a save leaves no `target` and the previous folder aside: that one is moved
    back, since the training-state checkpoint a run resumes from was written after the previous best model and
    before the new one (a resumed run evaluates that step again and saves the new one again). Half-written
    folders (`.NAME-new`, and the `.NAME-xxxxxxxx` folders of earlier versions) are removed.
    """
    target = Path(target)
    tmp, aside = staging_dirs(target)
    done = []
    if aside.is_dir():
        if target.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, target)
            fsync_path(target.parent)
            done.append(f"restored {target} from {aside.name} (a save was interrupted between its two renames)")
    if target.parent.is_dir():
        for leftover in sorted(target.parent.glob(f".{target.name}-*")):
            if leftover.is_dir() and leftover != aside:
                shutil.rmtree(leftover)
                done.append(f"removed {leftover}, a {target.name} folder whose save was interrupted")
    return done
def write_model_info(path: Path | str, info: ModelInfo) -> None:
    """Rewrite a model folder's finetune.json (after calibration), by a rename so readers never see half a file."""
    target = Path(path) / METADATA_FILE
    tmp = target.with_name(f".{METADATA_FILE}.tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2))
    os.replace(tmp, target)


def read_model_info(path: Path | str) -> ModelInfo:
    """The ModelInfo of a model folder, or a CheckpointError naming finetune.json and what is wrong with it."""
    meta = Path(path) / METADATA_FILE
    if not meta.is_file():
        raise CheckpointError(f"{path} is not a finetune model folder (no {METADATA_FILE})")
    try:
        values = json.loads(meta.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"a JSON object is expected, not {type(values).__name__}")
        return ModelInfo.from_dict(values)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{meta} is unreadable ({type(e).__name__}: {str(e)[:200]}); the model folder is "
                              "damaged: save or download it again") from None
