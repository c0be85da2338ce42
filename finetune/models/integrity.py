"""The check every model loader runs first: is this model folder complete, consistent and what was saved?

Serving, `finetune predict`, `finetune export`, the evaluation after training and the MLflow model all load
through `Predictor.from_dir`, `OnnxPredictor.from_dir` or `mlflow_model.predictor_from_data`, and each calls
`check_model_folder` before it reads a weight. A folder is refused, with the file named, when finetune.json or
config.json is missing or unreadable, when it has no safetensors weights, when a weights file is truncated or
its header unreadable, when the tokenizer files are missing (transformers would quietly build a tokenizer that
knows only its special tokens, and every text would get the same answer), when the tokenizer's vocabulary does
not fit the model's embeddings, and when a file does not match the checksum recorded when it was saved
(`checksums.json`; folders saved before it existed are not verified, the other checks still apply).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import CheckpointError
from finetune.families.pooling import install_pooling
from finetune.models.adapters import ADAPTER_WEIGHTS
from finetune.models.checksums import manifest_problem, read_manifest
from finetune.models.modeling import MANIFEST_FILE, ModelInfo, load_tokenizer, model_class, read_model_info
from finetune.tasks import TASKS, get_task

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


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; the model folder is damaged or incomplete: save, export or download it again")


def _weights_files(weights_dir: Path) -> list[Path]:
    if (weights_dir / WEIGHTS_FILE).is_file():
        return [weights_dir / WEIGHTS_FILE]
    index = weights_dir / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise _damaged(index, f"unreadable ({type(e).__name__})") from None
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
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _damaged(path, f"unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise _damaged(path, "not a transformers config (no model_type)")
    return config


def check_model_folder(root: Path | str, weights_dir: Path | str | None = None,
                       tokenizer_dir: Path | str | None = None) -> CheckedModel:
    """Check a model folder and load its tokenizer; raises CheckpointError naming the missing or bad file.

    `root` holds finetune.json (and checksums.json, its paths relative to `root`); the weights and config are in
    `weights_dir`, the tokenizer in `tokenizer_dir` (both default to `root`; an MLflow model keeps them in
    `model/` and `components/tokenizer/`).
    """
    root = Path(root)
    weights_dir = Path(weights_dir) if weights_dir is not None else root
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else root
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder")
    info = read_model_info(root)
    if info.task not in TASKS:
        raise CheckpointError(f"{root / 'finetune.json'}: task {info.task!r} is not one this finetune knows "
                              f"({', '.join(TASKS)})")
    config = _config(weights_dir)
    if info.adapter:  # an adapter model: the adapter and head weights here, the base checkpoint elsewhere
        weights = [weights_dir / ADAPTER_WEIGHTS]
        if not weights[0].is_file():
            raise _damaged(weights[0], "missing (an adapter model's weights)")
    else:
        weights = _weights_files(weights_dir)
    problem = manifest_problem(root, MANIFEST_FILE)
    if problem:
        raise _damaged(root, problem)
    listed = read_manifest(root, MANIFEST_FILE)
    unlisted = [w for w in weights if listed is not None and w.relative_to(root).as_posix() not in listed]
    if unlisted:
        raise _damaged(unlisted[0], f"not listed in {MANIFEST_FILE}, so it is not the file that was saved")
    if listed is None:
        for path in weights:
            _check_safetensors_header(path)
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
    return CheckedModel(info, weights_dir, tokenizer)


def load_weights(checked: CheckedModel, base_path: Path | str | None = None) -> Any:
    """The task model of a checked folder, from its safetensors weights (never a pickle); an adapter model with its
    base checkpoint (`base_path`, else the one finetune.json names)."""
    task = get_task(checked.info.task)
    if checked.info.adapter:
        from finetune.models.adapters import load_adapter_model

        return load_adapter_model(checked.weights_dir, task, checked.info.adapter, base_path)
    try:
        return install_pooling(model_class(task).from_pretrained(checked.weights_dir, use_safetensors=True))
    except Exception as e:  # a config and weights that do not fit each other, say: named, not a traceback
        raise CheckpointError(f"{checked.weights_dir}: the weights do not load ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
