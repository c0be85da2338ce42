"""A trained model ready to answer: tokenise, batch, run, post-process through the task definition.

Everything that predicts (`finetune predict`, the MLflow model, the server, export checks) goes through
`Predictor`, so post-processing is the task definition's, everywhere.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune.models.bigbird import (
    RULE_ATTRIBUTE, attention_for_batch, is_bigbird, plan_batches, sparse_min_length,
)
from finetune.models.adapter_rows import rows_of_adapters
from finetune.models.integrity import check_model_folder, load_weights
from finetune.models.modeling import ModelInfo, make_collator
from finetune.tasks import Encoded, PostprocessOptions, get_task
from finetune.threads import ThreadBudget, process_budget


class Predictor:
    """A trained model ready to answer: tokenise, batch, run, post-process through the task definition."""

    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo, batch_size: int = 32, precision: str = "fp32"):
        self.model = model.eval()
        self.device = torch.device("cpu")
        self.precision = check_inference_precision(precision)
        self.tokenizer = tokenizer
        self.info = info
        self.task = get_task(info.task)
        self.settings = info.task_settings
        self.batch_size = batch_size
        self.unverified: list[str] = []
        """What the model folder's checksums did not cover when it loaded (`CheckedModel.unverified`), for people."""
        self.threads: ThreadBudget | None = None
        """Sizes the math's thread pool before each batch (a server's budget); None: the process's
        (`finetune.threads.process_budget`), so every path that predicts is sized like training and serving."""
        self.collator = make_collator(tokenizer, model.config, self.task, self.settings, info.pad_to_multiple_of,
                                      info.max_length)
        if is_bigbird(model) and info.sparse_attention_min_length is not None:
            # finetune.json states the rule the model was trained with; it wins over whatever the config says.
            setattr(model.config, RULE_ATTRIBUTE, sparse_min_length(model.config, info.sparse_attention_min_length))

    @classmethod
    def from_dir(cls, path: Path | str, tokenizer_path: Path | str | None = None, base_path: Path | str | None = None,
                 **kwargs: Any) -> "Predictor":
        """Load a model folder written by `save_model_dir` (safetensors only), once `check_model_folder` passes.

        An adapter model loads its base checkpoint too (`base_path`, else the one finetune.json names).
        """
        checked = check_model_folder(path, tokenizer_dir=tokenizer_path)
        predictor = cls(load_weights(checked, base_path), checked.tokenizer, checked.info, **kwargs)
        predictor.unverified = list(checked.unverified)
        return predictor

    def to_device(self, device: str = "auto") -> "Predictor":
        """Run on `device`: cpu, cuda (refused without a GPU) or auto (the GPU when there is one). Returns self."""
        self.device = inference_device(device)
        if self.device.type != "cpu":
            self.model.to(self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("precision 'fp16' needs a GPU (--device cuda); on a CPU use bf16 or fp32")
        return self

    @property
    def runtime(self) -> str:
        """What runs the forward pass, for people: "pytorch fp32", "pytorch bf16 on cuda", "onnxruntime int8"..."""
        return f"pytorch {self.precision}" + (f" on {self.device.type}" if self.device.type != "cpu" else "")

    def encode_inputs(self, inputs: Sequence[Any]) -> Encoded:
        """Check inputs (raising `InputError` for the first bad one) and turn them into model features."""
        inputs = self.task.parse_inputs(inputs, self.info.text_pair)
        return self.task.encode(self.tokenizer, inputs, self.info.text_pair, self.info.max_length, self.settings)

    def example_features(self) -> list[dict[str, Any]]:
        """The features of the task's example input (what start-up warms the model with and load-time checks run)."""
        return self.encode_inputs([self.task.example_input(self.info.text_pair)]).features

    def encoding_key(self) -> str | None:
        """What decides `encode_inputs`'s result, as one string: two predictors with one key encode every input
        alike, so they can share a tokenising thread (the server's adapters of one base). None for a tokenizer
        without a fast backend, whose state cannot be compared whole."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        tokenizer = self.tokenizer
        return json.dumps({
            "task": self.info.task, "text_pair": self.info.text_pair, "max_length": self.info.max_length,
            "settings": self.settings.encoding(), "class": type(tokenizer).__name__,
            "backend": hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest(),
            "sides": [tokenizer.padding_side, tokenizer.truncation_side], "model_max_length": tokenizer.model_max_length,
            "special": tokenizer.special_tokens_map,
        }, sort_keys=True, default=str)

    def outputs(self, features: list[dict[str, Any]], adapter_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """The model's output for every feature, in feature order (batches are formed by length to limit padding).

        Per-token outputs (NER, QA) are cut to each feature's own length. Batches are formed so that a
        feature's attention type and block layout never depend on the features it is batched with (see
        `plan_batches`), so a served input gets the same answer however requests are coalesced.
        `adapter_names`: for a model holding several adapters (`finetune.models.adapters.SharedAdapters`), the
        adapter each feature runs with, one per feature.
        """
        out: list[Any] = [None] * len(features)
        budget = self.budget()
        for idx in plan_batches([_length(f) for f in features], self.batch_size, self.model.config,
                                self.info.pad_to_multiple_of):
            self.use_threads(budget)  # before each batch: the budget follows the machine's load
            batch = self.collator([features[i] for i in idx])
            with attention_for_batch(self.model, batch["input_ids"]):
                rows = self._forward(batch) if adapter_names is None else \
                    self._forward(batch, [adapter_names[i] for i in idx])  # ONNX's _forward takes no names
            for row, i in zip(rows, idx):
                out[i] = row[: _length(features[i])] if self.task.per_token else row
        return out

    def budget(self) -> ThreadBudget:
        """The thread budget this predictor's batches follow."""
        return self.threads or process_budget()

    def use_threads(self, budget: ThreadBudget) -> None:
        """Size the calling thread's math to the budget (OpenMP counts belong to the thread that runs the model)."""
        budget.apply()

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
    def _forward(self, batch: dict[str, torch.Tensor], adapter_names: list[str] | None = None) -> np.ndarray:
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        per_row = nullcontext() if adapter_names is None else rows_of_adapters(self.model, adapter_names)
        with inference_autocast(self.precision, self.device.type), per_row:
            output = self.model(**batch)
        return self.task.output_array(output).float().cpu().numpy()

    def answer(self, inputs: Sequence[Any], encoded: Encoded, rows: Sequence[np.ndarray],
               options: PostprocessOptions | None = None) -> list[dict[str, Any]]:
        """One answer per input from the outputs of its features (the task definition's post-processing)."""
        options = options or PostprocessOptions(threshold=self.info.threshold)
        return self.task.answer(list(inputs), encoded, rows, self.info.label_names, self.settings, options)

    def predict(self, inputs: Sequence[Any], options: PostprocessOptions | None = None) -> list[dict[str, Any]]:
        """One answer per input: label and scores, labels over the threshold, a value, entities, an answer span or a choice."""
        encoded = self.encode_inputs(inputs)
        return self.answer(inputs, encoded, self.outputs(encoded.features), options)


INFERENCE_PRECISIONS = ("fp32", "bf16", "fp16")
INFERENCE_DEVICES = ("auto", "cpu", "cuda")


def inference_autocast(precision: str, device_type: str = "cpu") -> torch.autocast:
    """The autocast region a forward pass runs in at an inference precision (`INFERENCE_PRECISIONS`) on a device
    type (fp16 is for GPUs: `Predictor.to_device` refuses it on a CPU)."""
    return torch.autocast(device_type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                          enabled=precision != "fp32")


def inference_device(device: str = "auto") -> torch.device:
    """The torch device of `--device`: auto is the first GPU when CUDA has one, else the CPU. Raises ValueError
    naming the allowed values, or when cuda is asked for and there is none."""
    if device not in INFERENCE_DEVICES:
        raise ValueError(f"device {device!r}: allowed values are {', '.join(INFERENCE_DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': this machine has no CUDA GPU that PyTorch can use; use --device cpu")
    return torch.device(device)


def check_inference_precision(precision: str) -> str:
    """The precision a Predictor runs in: fp32 (what evaluation uses, so answers match the logged metrics
    exactly), bf16 autocast (faster on CPUs that compute bf16 natively and on GPUs; answers can differ near ties)
    or fp16 autocast (GPUs only).

    Raises ValueError naming the allowed values. Block-sparse BigBird runs in bf16 too (`finetune.models.bigbird`).
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision {precision!r}: allowed values are {', '.join(INFERENCE_PRECISIONS)}")
    return precision


def _length(features: dict[str, Any]) -> int:
    """Tokens of one feature (for multiple choice, of its longest choice)."""
    ids = features["input_ids"]
    return max(len(x) for x in ids) if ids and isinstance(ids[0], list) else len(ids)
