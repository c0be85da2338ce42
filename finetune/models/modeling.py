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

from finetune.config.recipe import MAX_TOKENS, ModelSection
from finetune.errors import CheckpointError
from finetune.families import family_of
from finetune.families.pooling import CONFIG_KEY as POOLING_KEY
from finetune.families.pooling import choose_pooling
from finetune.models.bigbird import RULE_ATTRIBUTE, is_block_sparse, sparse_min_length
from finetune.files import is_link, read_json, write_atomic
from finetune.models.checksums import (
    STAGING_MARKER, fsync_path, fsync_tree, is_staging, mark_staging, read_manifest, record_files, write_manifest,
)
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
    manifest: str | None = None
    """The checksums manifest that lists this file (`MANIFEST_FILE`); None in folders saved before finetune.json was
    listed. A folder that says it has one and lacks it is refused, not loaded unverified."""

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

    The folder records the checksums of every file it holds but the recipe, finetune.json included
    (`MANIFEST_FILE`, written last), which every loader compares (`finetune.models.integrity`). The rename means a
    crash mid-save leaves the previous best model intact instead of half a new one; `recover_model_dir` finishes or
    undoes a save a crash interrupted. A link at `target` or at its staging names is refused (nothing is written
    through it), and a folder in the way that finetune did not make is never deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, aside = staging_dirs(target)
    check_save_target(target)
    if tmp.exists():
        shutil.rmtree(tmp)  # check_save_target made sure it is a staging folder of finetune's
    tmp.mkdir()  # not mkdtemp: a model folder gets the user's usual permissions (umask), not 0700
    mark_staging(tmp, target.name)
    if is_block_sparse(model.config):
        info = replace(info, sparse_attention_min_length=sparse_min_length(model.config))
    info = replace(info, manifest=MANIFEST_FILE)  # so a folder whose manifest was deleted is told from an old one
    model.save_pretrained(tmp, safe_serialization=True)
    if hasattr(model, "peft_config"):
        # An adapter model saves only the adapter and the head; the task model's config keeps labels and head size.
        model.get_base_model().config.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's template card; MODEL_CARD.md is the model's
    tokenizer.save_pretrained(tmp)
    write_atomic(tmp / METADATA_FILE, json.dumps(asdict(info), indent=2))
    write_atomic(tmp / "recipe.yaml", recipe_yaml)
    # Last, so it lists (and vouches for) finetune.json too: labels and max_length are verified. The recipe is not
    # listed: nothing that answers reads it, and a folder without one stays loadable (export then asks --no-check).
    write_manifest(tmp, [p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                         if p.is_file() and p.name not in (STAGING_MARKER, "recipe.yaml")], MANIFEST_FILE)
    usual_file_modes(tmp)
    fsync_tree(tmp)
    if target.exists():
        if aside.exists():
            shutil.rmtree(aside)  # check_save_target: finetune's own
        mark_staging(target, target.name)  # the old folder, while it is aside, is known as finetune's
        os.replace(target, aside)
    os.replace(tmp, target)
    fsync_path(target.parent)
    if aside.exists():
        shutil.rmtree(aside)
    (target / STAGING_MARKER).unlink(missing_ok=True)
    return target


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc: setting it to read it back
    would briefly change it for every thread); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_file_modes(folder: Path) -> None:
    """Give every file in a model folder the mode a new file of the user's gets (0666 less the umask).

    safetensors' writer (and so save_pretrained's weights) creates its files 0600 whatever the umask, so a model
    a team shares through a group folder would be readable by its trainer only. Links are skipped, never followed.
    """
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if not is_link(path) and path.is_file() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)


def staging_dirs(target: Path) -> tuple[Path, Path]:
    """Where `save_model_dir` writes a new folder, and where it moves the old one aside during the swap."""
    return target.with_name(f".{target.name}-new"), target.with_name(f".{target.name}-old")


def check_save_target(target: Path) -> None:
    """Raise CheckpointError when `save_model_dir` could not save to `target` without following a link or deleting
    something finetune did not make: `target` or a staging name is a link, or a staging name holds a folder
    without finetune's marker. Called before training, so a run does not fail only at its first save."""
    target = Path(target)
    tmp, aside = staging_dirs(target)
    for path in (target, tmp, aside):
        if is_link(path):
            raise CheckpointError(
                f"{path} is a symbolic link (-> {os.readlink(path)}); finetune does not write or delete through "
                f"links: remove the link (what it points at is left alone) or choose another output_dir")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file, not a model folder; move it away or choose another output_dir")
    for path in (tmp, aside):
        if path.exists() and not is_staging(path, target.name):
            raise CheckpointError(
                f"{path} is in the way of saving {target.name}/ and finetune did not make it (no {STAGING_MARKER}), "
                "so it is not deleted: move or rename it")


def recover_model_dir(target: Path) -> list[str]:
    """Finish or undo a `save_model_dir` a crash interrupted; returns what was done, for people.

    Killed between its two renames, a save leaves no `target` and the previous folder aside: that one is moved
    back, since the training-state checkpoint a run resumes from was written after the previous best model and
    before the new one (a resumed run evaluates that step again and saves the new one again). A half-written
    `.NAME-new` is removed. Only folders carrying finetune's staging marker are moved or removed: a user's own
    `.NAME-old` or `.NAME-anything` is left alone (and said so when it is in the way), and links are never
    followed (CheckpointError, naming the link).
    """
    target = Path(target)
    tmp, aside = staging_dirs(target)
    done = []
    for path in (target, tmp, aside):
        if is_link(path):
            raise CheckpointError(
                f"{path} is a symbolic link (-> {os.readlink(path)}); finetune does not write or delete through "
                f"links: remove the link (what it points at is left alone) or choose another output_dir")
    if is_staging(aside, target.name):
        if target.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, target)
            (target / STAGING_MARKER).unlink(missing_ok=True)
            fsync_path(target.parent)
            done.append(f"restored {target} from {aside.name} (a save was interrupted between its two renames)")
    elif aside.exists():
        done.append(f"left {aside} alone: finetune did not make it (no {STAGING_MARKER}); move or rename it, it is "
                    f"in the way of saving {target.name}/")
    if is_staging(tmp, target.name):
        shutil.rmtree(tmp)
        done.append(f"removed {tmp}, a {target.name} folder whose save was interrupted")
    elif tmp.exists():
        done.append(f"left {tmp} alone: finetune did not make it (no {STAGING_MARKER}); move or rename it, it is "
                    f"in the way of saving {target.name}/")
    if target.exists() and target.is_dir() and (target / STAGING_MARKER).is_file():
        (target / STAGING_MARKER).unlink()  # killed after the second rename, before the marker went
    return done


def write_model_info(path: Path | str, info: ModelInfo) -> None:
    """Rewrite a model folder's finetune.json (after calibration), by a rename so readers never see half a file,
    and record its new checksum when the folder has a manifest (so the change is not taken for tampering)."""
    folder = Path(path)
    if read_manifest(folder, MANIFEST_FILE) is not None:
        info = replace(info, manifest=MANIFEST_FILE)
    write_atomic(folder / METADATA_FILE, json.dumps(asdict(info), indent=2))
    record_files(folder, [METADATA_FILE], MANIFEST_FILE)


def read_model_info(path: Path | str) -> ModelInfo:
    """The ModelInfo of a model folder, or a CheckpointError naming finetune.json and what is wrong with it: not a
    file, too large or too deep (`finetune.files`), not JSON, or a field of the wrong kind or out of range."""
    meta = Path(path) / METADATA_FILE
    if is_link(meta):
        raise CheckpointError(f"{meta} is a symbolic link; a model folder's finetune.json is a file of its own")
    if not meta.is_file():
        raise CheckpointError(f"{path} is not a finetune model folder (no {METADATA_FILE})")
    try:
        values = read_json(meta)
    except (OSError, ValueError) as e:  # RefusedDocument is a ValueError
        raise CheckpointError(f"{meta} is unreadable ({e}); the model folder is damaged: save or download it "
                              "again") from None
    problem = info_problem(values)
    if problem:
        raise CheckpointError(f"{meta}: {problem}; the model folder is damaged or was edited: save or download it "
                              "again")
    return ModelInfo.from_dict(values)


MAX_LABELS = 100_000
"""The most labels a finetune.json may list (far more than any head finetune trains)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def info_problem(values: Any) -> str | None:
    """What is wrong with the fields of a finetune.json (the first problem, for people), or None.

    Each field must have the kind ModelInfo gives it and a value a run could have written, so a hand-edited file
    is refused when the folder loads, never request by request once it serves.
    """
    from finetune.tasks import TASKS

    if not isinstance(values, dict):
        return f"a JSON object is expected, not {type(values).__name__}"
    task = values.get("task")
    if not isinstance(task, str) or task not in TASKS:
        return f"task {str(task)[:40]!r} is not one this finetune knows ({', '.join(TASKS)})"
    labels = values.get("label_names")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            return "label_names must be a list of non-empty texts"
        if not labels or len(labels) > MAX_LABELS:
            return f"label_names has {len(labels)} labels; 1 to {MAX_LABELS} are allowed"
        if len(set(labels)) != len(labels):
            twice = sorted({x for x in labels if labels.count(x) > 1})[:3]
            return f"label_names names {', '.join(repr(x[:40]) for x in twice)} more than once"
    if "text_pair" not in values or not isinstance(values["text_pair"], bool):
        return "text_pair must be true or false"
    for key, low in (("max_length", 1), ("pad_to_multiple_of", 1)):
        value = values.get(key, 1)
        if not _is_int(value) or not low <= value <= MAX_TOKENS:
            return f"{key} must be a whole number from {low} to {MAX_TOKENS}, not {str(value)[:40]!r}"
    if "max_length" not in values:
        return "max_length is missing"
    sparse = values.get("sparse_attention_min_length")
    if sparse is not None and (not _is_int(sparse) or not 0 <= sparse <= MAX_TOKENS):
        return f"sparse_attention_min_length must be a whole number from 0 to {MAX_TOKENS} or null"
    for key in ("checkpoint", "recipe_name"):
        if not isinstance(values.get(key, ""), str):
            return f"{key} must be a text"
    for key in ("metrics", "settings"):
        if not isinstance(values.get(key) or {}, dict):
            return f"{key} must be a JSON object"
    for key in ("calibration", "parent", "adapter"):
        if values.get(key) is not None and not isinstance(values[key], dict):
            return f"{key} must be a JSON object or null"
    if values.get("manifest") not in (None, MANIFEST_FILE):
        return f"manifest must be {MANIFEST_FILE!r} or null"
    try:
        ModelInfo.from_dict(values).task_settings  # pydantic: each setting's kind and range
    except Exception as e:  # pydantic's ValidationError and TypeError alike: a setting it cannot read
        return f"settings: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
    return None
