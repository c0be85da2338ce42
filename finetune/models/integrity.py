"""The check every model loader runs first: is this model folder complete, consistent and what was saved?

Serving, `finetune predict`, `finetune export`, the evaluation after training and the MLflow model all load
through `Predictor.from_dir`, `OnnxPredictor.from_dir` or `mlflow_model.predictor_from_data`, and each calls
`check_model_folder` before it reads a weight. A folder is refused, with the file named, when finetune.json or
config.json is missing or unreadable, when it has no safetensors weights, when a weights file is truncated or
its header unreadable, when the tokenizer files are missing (transformers would quietly build a tokenizer that
knows only its special tokens, and every text would get the same answer), when the tokenizer's vocabulary does
not fit the model's embeddings, and when a file does not match the checksum recorded when it was saved
(`checksums.json`, which lists finetune.json too). finetune.json is read bounded and type-checked,
then cross-checked against config.json: the task against the architecture, the label list against
id2label/num_labels (order included, so swapped labels are caught), max_length against the positions the model
has. A folder whose finetune.json says it was saved with a manifest and that lacks one is refused; folders saved
before checksums existed load unverified, with a warning (the other checks still apply).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import CheckpointError
from finetune.families import family_of
from finetune.families.pooling import install_pooling
from finetune.files import is_link, read_json
from finetune.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_config
from finetune.models.checksums import manifest_problem, read_manifest
from finetune.models.modeling import (
    MANIFEST_FILE, METADATA_FILE, ModelInfo, load_tokenizer, model_class, read_model_info,
)
from finetune.tasks import get_task

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# A tokenizer folder holds one of these (fast tokenizers, WordPiece, BPE, SentencePiece); tokenizer_config.json
# alone is not a tokenizer.
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
EMBEDDING_PADDING = 128
"""Embedding matrices are often padded to a multiple of up to 128 rows, so the vocabulary may be that much smaller."""


@dataclass
class CheckedModel:
    """A model folder that passed `check_model_folder`: what it says it is, and its tokenizer."""

    info: ModelInfo
    weights_dir: Path
    tokenizer: Any
    unverified: list[str] = field(default_factory=list)
    """What the checksums did not cover (no manifest, finetune.json not listed), as warned when it loaded."""


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; the model folder is damaged or incomplete: save, export or download it again")


def _weights_files(weights_dir: Path) -> list[Path]:
    if (weights_dir / WEIGHTS_FILE).is_file():
        return [weights_dir / WEIGHTS_FILE]
    index = weights_dir / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(read_json(index, max_bytes=64_000_000)["weight_map"].values()))
            if not all(isinstance(s, str) and "/" not in s and s not in ("", ".", "..") for s in shards):
                raise ValueError("a shard name is not a file name of the folder")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise _damaged(index, f"unreadable ({type(e).__name__}: {str(e)[:120]})") from None
        missing = [s for s in shards if not (weights_dir / s).is_file()]
        if missing:
            raise _damaged(weights_dir / missing[0], "missing (a shard the weights index lists)")
        return [weights_dir / s for s in shards]
    if list(weights_dir.glob("*.bin")):
        raise CheckpointError(f"{weights_dir} has only pickle weights (*.bin); finetune loads {WEIGHTS_FILE} only")
    raise _damaged(weights_dir / WEIGHTS_FILE, "missing")


def _check_safetensors_header(path: Path) -> None:
    """Without a checksum, at least the header must describe the file (catches truncation and garbage)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError derives from Exception only
        raise _damaged(path, f"not readable safetensors ({str(e)[:160]})") from None


def _config(weights_dir: Path) -> dict[str, Any]:
    path = weights_dir / "config.json"
    if not path.is_file():
        raise _damaged(path, "missing")
    try:
        config = read_json(path)
    except (OSError, ValueError) as e:  # finetune.files.RefusedDocument (too large, too deep, not JSON) included
        raise _damaged(path, f"unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise _damaged(path, "not a transformers config (no model_type)")
    return config


def _config_object(weights_dir: Path, values: dict[str, Any]) -> Any:
    """config.json as transformers reads it (id2label keys as numbers, defaults filled in), never running code."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(weights_dir, trust_remote_code=False)
    except Exception as e:  # an unknown model_type, a value of the wrong kind: transformers raises many kinds
        raise _damaged(weights_dir / "config.json", f"transformers cannot read it ({type(e).__name__}: "
                                                    f"{str(e)[:160]})") from None


def metadata_problem(info: ModelInfo, config: Any, adapter_model: bool = False) -> str | None:
    """Where finetune.json and config.json disagree (the first place, for people), or None.

    The task must be the head's (an adapter's config is the base's, its head is checked with the adapter), the
    label list must be config.json's id2label in the same order with num_labels outputs, max_length must fit the
    model's positions, and text_pair must be one the task reads.
    """
    task = get_task(info.task)
    head = task.auto_model.removeprefix("AutoModel")
    architectures = getattr(config, "architectures", None) or []
    if not adapter_model and architectures and not any(str(a).endswith(head) for a in architectures):
        return (f"config.json's architecture is {', '.join(map(str, architectures))[:80]}, but finetune.json says task "
                f"{info.task}, whose head is {head[3:]}")
    problem_type = getattr(config, "problem_type", None)
    if task.hf_problem_type and problem_type and problem_type != task.hf_problem_type:
        return (f"config.json's problem_type is {str(problem_type)[:40]!r}, but task {info.task} is "
                f"{task.hf_problem_type!r}")
    if task.has_label_names and info.label_names is None:
        return f"finetune.json has no label_names, which task {info.task} needs"
    outputs = task.num_labels(info.label_names)
    if outputs is not None and config.num_labels != outputs:
        labels = f" for label_names {_shown(info.label_names)}" if info.label_names is not None else ""
        return (f"config.json's num_labels {config.num_labels} is not the {outputs} outputs a {info.task} head "
                f"has{labels}: the labels must be the head's outputs, in order")
    if task.has_label_names and outputs == len(info.label_names):
        # One output per label (a task may size its head otherwise, e.g. one per step of an ordinal scale; then
        # config.json's id2label names outputs, not labels): the saved names are the head's, in order.
        id2label = getattr(config, "id2label", None) or {}
        saved = [id2label.get(i) for i in range(len(id2label))]
        if saved != info.label_names:
            return (f"finetune.json's label_names {_shown(info.label_names)} are not config.json's id2label "
                    f"{_shown(saved)} (num_labels {config.num_labels}): the labels must be the head's outputs, in "
                    "order")
    positions = family_of(config).usable_positions(config)
    if positions is not None and info.max_length > positions:
        return (f"finetune.json's max_length {info.max_length} is more than the {positions} positions the model has "
                "(config.json max_position_embeddings)")
    if info.text_pair and not task.reads_text_pair:
        return f"finetune.json's text_pair is true, but task {info.task} reads no text pairs"
    return None


def _shown(labels: list[Any]) -> str:
    shown = ", ".join(repr(str(x)[:30]) for x in labels[:6])
    return f"[{shown}{', ...' if len(labels) > 6 else ''}]"


def _manifest_coverage(root: Path, info: ModelInfo, listed: dict[str, Any] | None) -> list[str]:
    """What the manifest leaves unverified (warnings), or a CheckpointError when a manifest the folder says it was
    saved with is gone."""
    if listed is None:
        if info.manifest:
            raise _damaged(root / MANIFEST_FILE, "missing, though finetune.json says the folder was saved with it (a "
                                                 "file was deleted, or the folder copied in part)")
        return [f"{root} has no {MANIFEST_FILE} (saved by a finetune before checksums): its files are not verified; "
                "training or exporting it again writes a verified folder"]
    if METADATA_FILE not in listed:
        return [f"{root / METADATA_FILE} is not listed in {MANIFEST_FILE} (saved before finetune.json was): its "
                "labels and settings are cross-checked with config.json but not verified"]
    return []


def check_model_folder(root: Path | str, weights_dir: Path | str | None = None,
                       tokenizer_dir: Path | str | None = None) -> CheckedModel:
    """Check a model folder and load its tokenizer; raises CheckpointError naming the missing or bad file.

    `root` holds finetune.json (and checksums.json, its paths relative to `root`); the weights and config are in
    `weights_dir`, the tokenizer in `tokenizer_dir` (both default to `root`; an MLflow model keeps them in
    `model/` and `components/tokenizer/`). What the checksums do not cover is logged as a warning and listed in
    `CheckedModel.unverified`.
    """
    root = Path(root)
    weights_dir = Path(weights_dir) if weights_dir is not None else root
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else root
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder")
    if not (root / METADATA_FILE).is_file() and not is_link(root / METADATA_FILE):
        raise CheckpointError(f"{root} is not a finetune model folder (no {METADATA_FILE})")
    # The checksums first: a finetune.json or config.json edited after saving is named as such, not parsed.
    problem = manifest_problem(root, MANIFEST_FILE)
    if problem:
        raise _damaged(root, problem)
    listed = read_manifest(root, MANIFEST_FILE)
    info = read_model_info(root)
    unverified = _manifest_coverage(root, info, listed)
    config = _config(weights_dir)
    adapter_config = None
    if info.adapter:  # an adapter model: the adapter and head weights here, the base checkpoint elsewhere
        weights = [weights_dir / ADAPTER_WEIGHTS]
        if not weights[0].is_file():
            raise _damaged(weights[0], "missing (an adapter model's weights)")
        adapter_config = check_adapter_config(weights_dir, info.adapter, get_task(info.task))
    elif (weights_dir / ADAPTER_CONFIG).is_file():
        raise _damaged(weights_dir / ADAPTER_CONFIG, "present, but finetune.json names no adapter (its adapter entry)")
    else:
        weights = _weights_files(weights_dir)
    must_list = weights + [weights_dir / "config.json"] + ([weights_dir / ADAPTER_CONFIG] if adapter_config else [])
    unlisted = [w for w in must_list if listed is not None and w.relative_to(root).as_posix() not in listed]
    if unlisted:
        raise _damaged(unlisted[0], f"not listed in {MANIFEST_FILE}, so it is not the file that was saved")
    if listed is None:
        for path in weights:
            _check_safetensors_header(path)
    mismatch = metadata_problem(info, _config_object(weights_dir, config), adapter_model=bool(info.adapter))
    if mismatch:
        raise CheckpointError(f"{root}: {mismatch}; the model folder was edited or mixed from two models: save, "
                              "export or download it again")
    if not tokenizer_dir.is_dir() or not any((tokenizer_dir / name).is_file() for name in VOCABULARY_FILES):
        raise _damaged(tokenizer_dir, f"no tokenizer files (one of {', '.join(VOCABULARY_FILES)}); without them "
                                      "the tokenizer would know only its special tokens")
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except Exception as e:  # tokenizers and transformers raise many kinds for a bad file
        raise _damaged(tokenizer_dir, f"the tokenizer does not load ({type(e).__name__}: {str(e)[:160]})") from None
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, int):
        size = len(tokenizer)
        if size > vocab_size or size <= vocab_size - EMBEDDING_PADDING:
            raise _damaged(tokenizer_dir, f"the tokenizer has {size} tokens but config.json's vocab_size is "
                                          f"{vocab_size}: they are not the same model's")
    for warning in unverified:
        log.warning(warning)
    return CheckedModel(info, weights_dir, tokenizer, unverified)


def load_weights(checked: CheckedModel, base_path: Path | str | None = None) -> Any:
    """The task model of a checked folder, from its safetensors weights (never a pickle); an adapter model with its
    base checkpoint (`base_path`, else the one finetune.json names)."""
    task = get_task(checked.info.task)
    if checked.info.adapter:
        from finetune.models.adapters import load_adapter_model

        try:
            return load_adapter_model(checked.weights_dir, task, checked.info.adapter, base_path)
        except CheckpointError:
            raise
        except Exception as e:  # peft and transformers raise many kinds for weights that do not fit: named, not a traceback
            raise CheckpointError(f"{checked.weights_dir}: the adapter does not load ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
    try:
        return install_pooling(model_class(task).from_pretrained(checked.weights_dir, use_safetensors=True))
    except Exception as e:  # a config and weights that do not fit each other, say: named, not a traceback
        raise CheckpointError(f"{checked.weights_dir}: the weights do not load ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
