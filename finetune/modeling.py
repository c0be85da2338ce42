"""Building a task model from a checkpoint, saving it, and loading it back to predict.

A saved model is a plain Hugging Face folder (safetensors weights, tokenizer, config with
id2label/label2id) plus `finetune.json`, which says which task definition reads its logits.
Everything that predicts (the `predict` command, the MLflow model, the server) loads it through
`Predictor`, so post-processing is the task definition's, everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from finetune.bigbird import attention_for_batch
from finetune.checkpoints import CheckpointError, ResolvedCheckpoint, check_weights_format
from finetune.recipe import ModelSection
from finetune.tasks import PostprocessOptions, TaskDefinition, get_task

METADATA_FILE = "finetune.json"


@dataclass
class ModelInfo:
    """What travels with a saved model so it can be used without its recipe."""

    task: str
    label_names: list[str] | None
    text_pair: bool
    max_length: int
    threshold: float = 0.5
    checkpoint: str = ""
    recipe_name: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def build_model(resolved: ResolvedCheckpoint, model_cfg: ModelSection, task: TaskDefinition, label_names: list[str] | None):
    """A pretrained encoder with a fresh head for the task (and the checkpoint's tokenizer)."""
    check_weights_format(resolved.path, model_cfg.allow_pickle)
    extra: dict[str, Any] = {}
    if task.has_label_names:
        assert label_names is not None
        extra["id2label"] = dict(enumerate(label_names))
        extra["label2id"] = {name: i for i, name in enumerate(label_names)}
    for key in ("attention_type", "block_size", "num_random_blocks"):
        if getattr(model_cfg, key) is not None:
            extra[key] = getattr(model_cfg, key)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved.path,
            num_labels=task.num_labels(label_names),
            problem_type=task.problem_type,
            use_safetensors=not model_cfg.allow_pickle,
            trust_remote_code=model_cfg.trust_remote_code,
            **extra,
        )
    except ValueError as e:
        raise CheckpointError(
            f"model.checkpoint: {resolved.name} has no sequence-classification head class in transformers ({e})"
        ) from None
    tokenizer = load_tokenizer(resolved.path, model_cfg.trust_remote_code)
    return model, tokenizer


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def make_collator(tokenizer: Any, model_config: Any) -> DataCollatorWithPadding:
    """Dynamic padding to the longest example of each batch (a multiple of the block size for BigBird)."""
    multiple = model_config.block_size if model_config.model_type == "big_bird" else None
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)


def save_model_dir(target: Path, model: Any, tokenizer: Any, info: ModelInfo, recipe_yaml: str) -> Path:
    """Save a complete, loadable model folder; written beside the target then renamed into place.

    The rename means a crash mid-save leaves the previous best model intact instead of half a new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
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
    return ModelInfo(**json.loads(meta.read_text()))


class Predictor:
    """A trained model ready to answer: tokenise, batch, run, post-process through the task definition."""

    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo, batch_size: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.info = info
        self.task = get_task(info.task)
        self.batch_size = batch_size
        self.collator = make_collator(tokenizer, model.config)

    @classmethod
    def from_dir(cls, path: Path | str, tokenizer_path: Path | str | None = None, **kwargs: Any) -> "Predictor":
        """Load a model folder written by `save_model_dir` (safetensors only)."""
        info = read_model_info(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        tokenizer = load_tokenizer(tokenizer_path or path)
        return cls(model, tokenizer, info, **kwargs)

    def split_inputs(self, inputs: Sequence[Any]) -> tuple[list[str], list[str] | None]:
        """Texts (and second texts for pair models) from a list of strings or [text, text_pair] pairs."""
        if self.info.text_pair:
            bad = [i for i, x in enumerate(inputs) if not (isinstance(x, (list, tuple)) and len(x) == 2)]
            if bad:
                raise ValueError(f"this model reads sentence pairs: inputs {bad[:5]} are not [text, text_pair]")
            return [str(x[0]) for x in inputs], [str(x[1]) for x in inputs]
        bad = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
        if bad:
            raise ValueError(f"this model reads single texts: inputs {bad[:5]} are not strings")
        return list(inputs), None

    @torch.inference_mode()
    def encode(self, texts: list[str], pairs: list[str] | None) -> tuple[list[dict[str, list[int]]], list[bool]]:
        """Model features for each input (truncated to max_length), and whether each input was truncated."""
        limit = self.info.max_length
        # One tokenisation at limit + 1 tells which inputs are too long; only those are encoded again at the
        # limit (so pairs are truncated exactly as in training), which keeps the common case to one pass.
        encoded = self.task.tokenize(self.tokenizer, texts, pairs, limit + 1)
        features = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
        truncated = [len(f["input_ids"]) > limit for f in features]
        long = [i for i, t in enumerate(truncated) if t]
        if long:
            again = self.task.tokenize(self.tokenizer, [texts[i] for i in long],
                                       [pairs[i] for i in long] if pairs is not None else None, limit)
            for j, i in enumerate(long):
                features[i] = {k: again[k][j] for k in again}
        return features, truncated

    def logits(self, texts: list[str], pairs: list[str] | None) -> np.ndarray:
        """Raw logits for every input, in input order (batches are formed by length to limit padding)."""
        return self.logits_from_features(self.encode(texts, pairs)[0])

    @torch.inference_mode()
    def logits_from_features(self, features: list[dict[str, list[int]]]) -> np.ndarray:
        """Raw logits for already encoded inputs (see `encode`), in input order."""
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        out: list[np.ndarray | None] = [None] * len(features)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.collator([features[i] for i in idx])
            with attention_for_batch(self.model, batch["input_ids"]):
                logits = self._forward(batch)
            for row, i in zip(logits, idx):
                out[i] = row
        return np.stack(out) if out else np.zeros((0, self.model.config.num_labels))

    def _forward(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        return self.model(**batch).logits.float().numpy()

    def predict(self, inputs: Sequence[Any], options: PostprocessOptions | None = None) -> list[dict[str, Any]]:
        """One answer per input: label and scores, labels over the threshold, or a value."""
        texts, pairs = self.split_inputs(inputs)
        options = options or PostprocessOptions(threshold=self.info.threshold)
        return self.task.postprocess(self.logits(texts, pairs), self.info.label_names, options)
