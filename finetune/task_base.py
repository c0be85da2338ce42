"""The shape every task definition has, and the sequence tasks' implementation of it (see finetune.tasks).

A task says how text becomes model inputs, which head and loss the model uses (through the
Hugging Face `problem_type`), how gold labels are stored, which metrics apply, and how logits
become predictions. Training, evaluation, the MLflow model and the HTTP server all go through
these objects, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from finetune import metrics as M

IGNORE_INDEX = -100
"""Label id the Hugging Face heads leave out of the loss (padding, continuation word pieces)."""


class InputError(ValueError):
    """One request input the model cannot read; `index` is its position, the message says what is expected."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class TaskSettings:
    """The task knobs a recipe sets that training, evaluation and serving must all apply the same way."""

    threshold: float = 0.5
    label_all_tokens: bool = False
    doc_stride: int = 128
    max_answer_length: int = 30
    n_best_size: int = 20
    long_inputs: str = "truncate"
    chunk_stride: int = 64
    chunk_pooling: str = "mean"

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "TaskSettings":
        known = {k: v for k, v in (values or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Encoded:
    """Request inputs turned into model features.

    One input can give several features (QA windows over a long context), so each feature says
    which input it belongs to (`owner`) and carries what post-processing needs (`meta`: offsets).
    """

    features: list[dict[str, Any]]
    owner: list[int]
    meta: list[Any]
    truncated: list[bool]
    """Per input: whether part of it was cut off to fit the model's length."""


@dataclass
class FeatureContext:
    """What turning labelled rows into model features needs besides the rows themselves."""

    data: Any  # the recipe's DataSection
    tokenizer: Any
    max_length: int
    settings: TaskSettings
    label_names: Sequence[str] | None
    train: bool
    """Training features (QA: answer positions only) or evaluation ones (QA: also offsets and example ids)."""


@dataclass
class Reference:
    """An evaluation split as post-processing needs it: its features (with eval-only columns) and raw rows."""

    features: Any
    raw: Any
    data: Any  # the recipe's DataSection: which raw columns hold what


MAX_CHUNKS_PER_INPUT = 64
"""Serving with chunking: a text needing more windows than this is refused (422)."""


def pool_windows(rows: Sequence[np.ndarray], owners: Sequence[int], n: int, how: str) -> np.ndarray:
    """One row of logits per document from the logits of its windows: their mean or element-wise max.

    Mean lets every part of the document vote; max lets the most telling window decide (a document is
    hyperpartisan if any part is). Pooling logits rather than probabilities keeps mean pooling the
    same as averaging the windows' evidence before the softmax or sigmoid.
    """
    rows = [np.asarray(r, dtype=np.float64) for r in rows]
    pooled = []
    for i in range(n):
        mine = np.stack([r for r, o in zip(rows, owners) if o == i])
        pooled.append(mine.mean(axis=0) if how == "mean" else mine.max(axis=0))
    return np.stack(pooled) if pooled else np.zeros((0, 0))


def batch_texts(batch: dict[str, list], data: Any) -> tuple[list[str], list[str] | None]:
    """The text (and pair text) columns of a batch of rows, as strings."""
    texts = ["" if t is None else str(t) for t in batch[data.text_column]]
    pairs = None
    if data.text_pair_column:
        pairs = ["" if t is None else str(t) for t in batch[data.text_pair_column]]
    return texts, pairs


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


@dataclass(frozen=True)
class PostprocessOptions:
    """Per-request knobs for turning logits into answers."""

    threshold: float = 0.5
    """Multi-label: a label is predicted when its sigmoid score is at least this."""
    top_k: int | None = None
    """Classification: also return the k best labels with scores."""


@dataclass(frozen=True)
class TaskDefinition:
    """How one task preprocesses, trains, scores and answers."""

    name: str
    description: str
    problem_type: str | None
    """The Hugging Face `config.problem_type`; it selects the loss inside the model head."""
    metrics: dict[str, M.Metric] = field(repr=False)
    default_metric: str = ""
    has_label_names: bool = True
    """Regression predicts a number, so it has no label set."""
    auto_model: str = "AutoModelForSequenceClassification"
    """The transformers Auto class that puts this task's head on an encoder."""
    pipeline_task: str | None = "text-classification"
    """The transformers pipeline task of the MLflow transformers flavour (None: pyfunc only)."""
    keep_raw_columns: frozenset = frozenset({"labels"})
    """Columns of the labelled split that survive tokenisation (the rest is replaced by features)."""
    eval_only_columns: tuple = ("example_id",)
    """Feature columns evaluation needs for post-processing but the model must not receive."""
    per_token: bool = False
    """Whether a feature's output has one row per token (so it is trimmed to the feature's length)."""

    # --- preprocessing -------------------------------------------------------------------
    def tokenize(self, tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int) -> dict:
        """Tokenise texts (and second texts for pair tasks) without padding.

        Padding is left to the collator so batches pad only to their own longest example.
        """
        return tokenizer(
            list(texts),
            list(pairs) if pairs is not None else None,
            truncation=True,
            max_length=max_length,
        )

    def num_labels(self, label_names: Sequence[str] | None) -> int:
        return len(label_names) if self.has_label_names else 1

    # --- evaluation ----------------------------------------------------------------------
    def predictions(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Turn a batch of logits into what metrics compare against gold labels."""
        if self.problem_type == "single_label_classification":
            return logits.argmax(axis=-1)
        if self.problem_type == "multi_label_classification":
            return (sigmoid(logits) >= threshold).astype(np.int64)
        return logits.reshape(-1)

    def gold(self, labels: np.ndarray) -> np.ndarray:
        """Bring gold labels to the shape `predictions` returns."""
        if self.problem_type == "multi_label_classification":
            return labels.astype(np.int64)
        if self.problem_type == "regression":
            return labels.reshape(-1).astype(np.float64)
        return labels.astype(np.int64)

    def compute_metrics(self, logits: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
        """Every metric of this task, from raw logits and gold labels."""
        return M.compute_all(self.metrics, self.gold(labels), self.predictions(logits, threshold))

    def greater_is_better(self, metric: str) -> bool:
        return self.metrics[metric].greater_is_better

    # --- the interface every task implements (see task_ner, task_qa, task_choice) -----------
    def columns(self, data: Any) -> dict[str, str]:
        """Recipe key -> column name of every column this task reads."""
        wanted = {"data.text_column": data.text_column, "data.label_column": data.label_column}
        if data.text_pair_column:
            wanted["data.text_pair_column"] = data.text_pair_column
        return wanted

    def features(self, batch: dict[str, list], indices: list[int], ctx: FeatureContext) -> dict:
        """Model features for a batch of labelled rows (a `datasets.map(batched=True, with_indices=True)` function)."""
        texts, pairs = batch_texts(batch, ctx.data)
        if ctx.settings.long_inputs != "chunk":
            return self.tokenize(ctx.tokenizer, texts, pairs, ctx.max_length)
        # Chunking: every window of a document is an example with the document's label; evaluation pools
        # the windows' logits back into one prediction per document (example_id says whose window it is).
        encoded = self.chunk(ctx.tokenizer, texts, ctx.max_length, ctx.settings.chunk_stride)
        owners = encoded.pop("overflow_to_sample_mapping")
        encoded["labels"] = [batch["labels"][o] for o in owners]
        if not ctx.train:
            encoded["example_id"] = [indices[o] for o in owners]
        return encoded

    def chunk(self, tokenizer: Any, texts: Sequence[str], max_length: int, stride: int) -> Any:
        """Overlapping windows of max_length tokens covering each whole text (`stride` tokens shared)."""
        return tokenizer(list(texts), truncation=True, max_length=max_length, stride=stride,
                         return_overflowing_tokens=True)

    def token_lengths(self, batch: dict[str, list], data: Any, tokenizer: Any) -> list[int]:
        """Untruncated token counts of a batch of rows, for `finetune validate`."""
        texts, pairs = batch_texts(batch, data)
        return [len(ids) for ids in tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]]

    def collator(self, tokenizer: Any, pad_to_multiple_of: int | None) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def eval_tensors(self, outputs: Any, batch: dict) -> dict:
        """What evaluation gathers from every batch (across processes)."""
        return {"logits": outputs.logits, "labels": batch["labels"]}

    def evaluation(self, collected: dict[str, list[np.ndarray]], reference: Reference, settings: TaskSettings,
                   label_names: Sequence[str] | None) -> tuple[dict[str, float], Any]:
        """Metrics from everything gathered over a split, and the outputs the artifacts are made from."""
        logits = np.concatenate(collected["logits"])
        labels = np.concatenate(collected["labels"])
        if settings.long_inputs == "chunk":
            owners = list(reference.features["example_id"])
            logits = pool_windows(logits, owners, len(reference.raw), settings.chunk_pooling)
            labels = np.asarray(reference.raw["labels"])
        return self.compute_metrics(logits, labels, settings.threshold), logits

    def parse_inputs(self, inputs: Sequence[Any], text_pair: bool) -> list[Any]:
        """Check request inputs: strings, or [text, text_pair] pairs for pair models."""
        for i, item in enumerate(inputs):
            if text_pair:
                if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)):
                    raise InputError(i, "this model reads sentence pairs: give [text, text_pair]")
                if not item[0].strip() or not item[1].strip():
                    raise InputError(i, "empty text")
            else:
                if not isinstance(item, str):
                    raise InputError(i, "this model reads single texts: give a string")
                if not item.strip():
                    raise InputError(i, "empty text")
        return list(inputs)

    def encode(self, tokenizer: Any, inputs: list[Any], text_pair: bool, max_length: int, settings: TaskSettings) -> Encoded:
        """Features for checked inputs, truncated to max_length, with which inputs were truncated."""
        texts = [x[0] if text_pair else x for x in inputs]
        pairs = [x[1] for x in inputs] if text_pair else None
        if settings.long_inputs == "chunk":
            encoded = self.chunk(tokenizer, texts, max_length, settings.chunk_stride)
            owners = list(encoded.pop("overflow_to_sample_mapping"))
            for i in range(len(texts)):
                if owners.count(i) > MAX_CHUNKS_PER_INPUT:
                    raise InputError(i, f"the text needs {owners.count(i)} windows of {max_length} tokens; "
                                        f"at most {MAX_CHUNKS_PER_INPUT} per input")
            features = [{k: encoded[k][j] for k in encoded} for j in range(len(owners))]
            return Encoded(features, owners, [None] * len(features), [False] * len(texts))
        # One tokenisation at max_length + 1 tells which inputs are too long; only those are encoded again at
        # the limit (so pairs are truncated exactly as in training), which keeps the common case to one pass.
        encoded = self.tokenize(tokenizer, texts, pairs, max_length + 1)
        features = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
        truncated = [len(f["input_ids"]) > max_length for f in features]
        long = [i for i, t in enumerate(truncated) if t]
        if long:
            again = self.tokenize(tokenizer, [texts[i] for i in long],
                                  [pairs[i] for i in long] if pairs is not None else None, max_length)
            for j, i in enumerate(long):
                features[i] = {k: again[k][j] for k in again}
        return Encoded(features, list(range(len(features))), [None] * len(features), truncated)

    def output_array(self, outputs: Any) -> Any:
        """The one tensor a forward pass answers with (batch first)."""
        return outputs.logits

    def answer(self, inputs: list[Any], encoded: Encoded, rows: Sequence[np.ndarray], label_names: Sequence[str] | None,
               settings: TaskSettings, options: "PostprocessOptions") -> list[dict[str, Any]]:
        """One JSON-ready answer per input from the outputs of its features."""
        logits = np.stack(list(rows))
        if settings.long_inputs == "chunk":
            logits = pool_windows(logits, encoded.owner, len(inputs), settings.chunk_pooling)
        answers = self.postprocess(logits, label_names, options)
        for answer, was_truncated in zip(answers, encoded.truncated):
            answer["truncated"] = was_truncated
        return answers

    def label_ids(self, values: Sequence[Any], label_names: Sequence[str] | None, by_position: bool) -> tuple[list, list]:
        """Span and choice tasks: label ids for a label column, and the values that cannot be mapped."""
        raise NotImplementedError  # the sequence tasks are labelled by finetune.data.encode_labels

    def label_counts(self, split: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
        """How many examples of a labelled split carry each label (regression: the value range)."""
        labels = split["labels"]
        if self.name == "regression":
            arr = np.asarray(labels, dtype=float)
            return {"min": float(arr.min()), "mean": float(arr.mean()), "max": float(arr.max())}
        assert label_names is not None
        if self.name == "multi_label":
            counts = np.asarray(labels).sum(axis=0).astype(int)
        else:
            counts = np.bincount(np.asarray(labels, dtype=int), minlength=len(label_names))
        return {name: int(c) for name, c in zip(label_names, counts)}

    def example_input(self, text_pair: bool) -> Any:
        """A valid input, for warm-up and the MLflow signature."""
        return ["The first sentence.", "The second sentence."] if text_pair else "a gripping, beautiful film"

    # --- answers -------------------------------------------------------------------------
    def postprocess(
        self, logits: np.ndarray, label_names: Sequence[str] | None, options: PostprocessOptions = PostprocessOptions()
    ) -> list[dict[str, Any]]:
        """Turn a batch of logits into one JSON-ready answer per input."""
        answers: list[dict[str, Any]] = []
        if self.problem_type == "single_label_classification":
            probs = softmax(logits.astype(np.float64))
            for row in probs:
                best = int(row.argmax())
                answer: dict[str, Any] = {
                    "label": label_names[best],
                    "score": float(row[best]),
                    "scores": {name: float(p) for name, p in zip(label_names, row)},
                }
                if options.top_k:
                    order = np.argsort(-row, kind="stable")[: options.top_k]
                    answer["top_k"] = [{"label": label_names[i], "score": float(row[i])} for i in order]
                answers.append(answer)
        elif self.problem_type == "multi_label_classification":
            probs = sigmoid(logits.astype(np.float64))
            for row in probs:
                chosen = [i for i in np.argsort(-row, kind="stable") if row[i] >= options.threshold]
                answers.append(
                    {
                        "labels": [label_names[i] for i in chosen],
                        "label_scores": [float(row[i]) for i in chosen],
                        "scores": {name: float(p) for name, p in zip(label_names, row)},
                    }
                )
        else:
            answers = [{"value": float(v)} for v in logits.reshape(-1)]
        return answers
