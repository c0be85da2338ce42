"""Building a task model from a checkpoint, and the saved model folder.

A saved model is a plain Hugging Face folder (safetensors weights, tokenizer, config with
id2label/label2id) plus `finetune.json` (`ModelInfo`), which says which task definition reads its
outputs and with which settings. Everything that predicts loads it through `finetune.models.predictor`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoTokenizer

from finetune.config.recipe import ModelSection
from finetune.errors import CheckpointError
from finetune.models.bigbird import RULE_ATTRIBUTE, is_block_sparse, sparse_min_length
from finetune.models.pretrained import ResolvedCheckpoint, check_weights_format
from finetune.tasks import Task, TaskSettings

METADATA_FILE = "finetune.json"


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
    sparse_attention_min_length: int | None = None
    """Block-sparse BigBird: the padded batch length from which batches run block-sparse (the rule it was trained with)."""

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
    if task.hf_problem_type is not None:
        extra["problem_type"] = task.hf_problem_type
    if task.num_labels(label_names) is not None:
        extra["num_labels"] = task.num_labels(label_names)
    try:
        model, loading_info = model_class(task).from_pretrained(
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
    if is_block_sparse(model.config):
        # On the config, so save_pretrained carries the rule to evaluation, the MLflow model and serving.
        setattr(model.config, RULE_ATTRIBUTE, sparse_min_length(model.config, model_cfg.sparse_attention_min_length))
    tokenizer = load_tokenizer(resolved.path, model_cfg.trust_remote_code)
    return model, tokenizer, new_weights(model, loading_info)


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def make_collator(tokenizer: Any, model_config: Any, task: Task) -> Any:
    """The task's collator, padding each batch to its longest example (a multiple of the block size for BigBird)."""
    multiple = model_config.block_size if model_config.model_type == "big_bird" else None
    return task.collator(tokenizer, multiple)


def save_model_dir(target: Path, model: Any, tokenizer: Any, info: ModelInfo, recipe_yaml: str) -> Path:
    """Save a complete, loadable model folder; written beside the target then renamed into place.

    The rename means a crash mid-save leaves the previous best model intact instead of half a new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    if is_block_sparse(model.config):
        info = replace(info, sparse_attention_min_length=sparse_min_length(model.config))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / METADATA_FILE).write_text(json.dumps(asdict(info), indent=2))
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    old = target.with_name(f".{target.name}-old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def read_model_info(path: Path | str) -> ModelInfo:
    meta = Path(path) / METADATA_FILE
    if not meta.is_file():
        raise CheckpointError(f"{path} is not a finetune model folder (no {METADATA_FILE})")
    return ModelInfo.from_dict(json.loads(meta.read_text()))


