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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer

from finetune.bigbird import RULE_ATTRIBUTE, attention_for_batch, is_bigbird, is_block_sparse, plan_batches, sparse_min_length
from finetune.checkpoints import CheckpointError, ResolvedCheckpoint, check_weights_format
from finetune.recipe import ModelSection
from finetune.tasks import Encoded, PostprocessOptions, TaskDefinition, TaskSettings, get_task

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
    settings: dict[str, Any] = field(default_factory=dict)
    """The recipe's task settings (finetune.tasks.TaskSettings) the model was trained and evaluated with."""
    sparse_attention_min_length: int | None = None
    """Block-sparse BigBird: the padded batch length from which batches run block-sparse (the rule it was trained with)."""

    @property
    def task_settings(self) -> TaskSettings:
        return TaskSettings.from_dict({"threshold": self.threshold} | self.settings)


def model_class(task: TaskDefinition) -> Any:
    """The transformers Auto class for the task's head (a fixed registry: names come from task definitions, never YAML)."""
    return getattr(transformers, task.auto_model)


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
    if task.problem_type is not None:
        extra["problem_type"] = task.problem_type
    if task.num_labels(label_names) is not None:
        extra["num_labels"] = task.num_labels(label_names)
    try:
        model = model_class(task).from_pretrained(
            resolved.path,
            use_safetensors=not model_cfg.allow_pickle,
            trust_remote_code=model_cfg.trust_remote_code,
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
    return model, tokenizer


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def make_collator(tokenizer: Any, model_config: Any, task: TaskDefinition) -> Any:
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
    return ModelInfo(**json.loads(meta.read_text()))


class Predictor:
    """A trained model ready to answer: tokenise, batch, run, post-process through the task definition."""

    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo, batch_size: int = 32, precision: str = "fp32"):
        self.model = model.eval()
        self.precision = check_inference_precision(precision, model.config)
        self.tokenizer = tokenizer
        self.info = info
        self.task = get_task(info.task)
        self.settings = info.task_settings
        self.batch_size = batch_size
        self.collator = make_collator(tokenizer, model.config, self.task)
        if is_bigbird(model) and info.sparse_attention_min_length is not None:
            # finetune.json states the rule the model was trained with; it wins over whatever the config says.
            setattr(model.config, RULE_ATTRIBUTE, sparse_min_length(model.config, info.sparse_attention_min_length))

    @classmethod
    def from_dir(cls, path: Path | str, tokenizer_path: Path | str | None = None, **kwargs: Any) -> "Predictor":
        """Load a model folder written by `save_model_dir` (safetensors only)."""
        info = read_model_info(path)
        model = model_class(get_task(info.task)).from_pretrained(path, use_safetensors=True)
        tokenizer = load_tokenizer(tokenizer_path or path)
        return cls(model, tokenizer, info, **kwargs)

    @property
    def runtime(self) -> str:
        """What runs the forward pass, for people: "pytorch fp32", "pytorch bf16", "onnxruntime int8"..."""
        return f"pytorch {self.precision}"

    def encode_inputs(self, inputs: Sequence[Any]) -> Encoded:
        """Check inputs (raising `InputError` for the first bad one) and turn them into model features."""
        inputs = self.task.parse_inputs(inputs, self.info.text_pair)
        return self.task.encode(self.tokenizer, inputs, self.info.text_pair, self.info.max_length, self.settings)

    def outputs(self, features: list[dict[str, Any]]) -> list[np.ndarray]:
        """The model's output for every feature, in feature order (batches are formed by length to limit padding).

        Per-token outputs (NER, QA) are cut to each feature's own length. Batches are formed so that a
        feature's attention type and block layout never depend on the features it is batched with (see
        `plan_batches`), so a served input gets the same answer however requests are coalesced.
        """
        out: list[Any] = [None] * len(features)
        for idx in plan_batches([_length(f) for f in features], self.batch_size, self.model.config):
            batch = self.collator([features[i] for i in idx])
            with attention_for_batch(self.model, batch["input_ids"]):
                rows = self._forward(batch)
            for row, i in zip(rows, idx):
                out[i] = row[: _length(features[i])] if self.task.per_token else row
        return out

    def logits(self, texts: list[str], pairs: list[str] | None) -> np.ndarray:
        """Sequence tasks: raw logits for every text (or pair), in input order."""
        return self.logits_from_features(self.encode(texts, pairs)[0])

    def encode(self, texts: list[str], pairs: list[str] | None) -> tuple[list[dict[str, Any]], list[bool]]:
        """Sequence tasks: features for texts (or pairs), truncated to max_length, and which were truncated."""
        inputs = list(zip(texts, pairs)) if pairs is not None else list(texts)
        encoded = self.task.encode(self.tokenizer, inputs, self.info.text_pair, self.info.max_length, self.settings)
        return encoded.features, encoded.truncated

    def logits_from_features(self, features: list[dict[str, Any]]) -> np.ndarray:
        """Sequence tasks: raw logits for already encoded inputs (see `encode`), in input order."""
        rows = self.outputs(features)
        return np.stack(rows) if rows else np.zeros((0, self.model.config.num_labels))

    @torch.inference_mode()
    def _forward(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            output = self.model(**batch)
        return self.task.output_array(output).float().numpy()

    def answer(self, inputs: Sequence[Any], encoded: Encoded, rows: Sequence[np.ndarray],
               options: PostprocessOptions | None = None) -> list[dict[str, Any]]:
        """One answer per input from the outputs of its features (the task definition's post-processing)."""
        options = options or PostprocessOptions(threshold=self.info.threshold)
        return self.task.answer(list(inputs), encoded, rows, self.info.label_names, self.settings, options)

    def predict(self, inputs: Sequence[Any], options: PostprocessOptions | None = None) -> list[dict[str, Any]]:
        """One answer per input: label and scores, labels over the threshold, a value, entities, an answer span or a choice."""
        encoded = self.encode_inputs(inputs)
        return self.answer(inputs, encoded, self.outputs(encoded.features), options)


INFERENCE_PRECISIONS = ("fp32", "bf16")


def check_inference_precision(precision: str, config: Any) -> str:
    """The precision a Predictor runs in: fp32 (what evaluation uses, so answers match the logged metrics
    exactly) or bf16 autocast (faster on CPUs that compute bf16 natively; answers can differ near ties).

    Raises ValueError naming the allowed values, or why a model cannot run in bf16.
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision {precision!r}: allowed values are {', '.join(INFERENCE_PRECISIONS)}")
    if precision == "bf16" and is_block_sparse(config):
        # The same limit training has: transformers' block-sparse attention fails under autocast.
        raise ValueError("precision bf16: block-sparse BigBird runs in fp32 only (transformers' block-sparse "
                         "attention fails under autocast); allowed for this model: fp32")
    return precision


def _length(features: dict[str, Any]) -> int:
    """Tokens of one feature (for multiple choice, of its longest choice)."""
    ids = features["input_ids"]
    return max(len(x) for x in ids) if ids and isinstance(ids[0], list) else len(ids)
