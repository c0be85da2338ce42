"""What the sentence tasks share: one text (or a pair) in, one row of logits out.

Classification, multi-label and regression differ only in their labels, loss, metrics and answers (their
own modules); how they tokenise, read long texts in windows (`task.long_inputs: chunk`), check request
inputs and write predictions.csv is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import finetune.tasks.metrics as M
from finetune.tasks.base import (Encoded, FeatureContext, InputError, PostprocessOptions, Reference, Task, TaskSettings,
                                 nfc_all)

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
    texts = nfc_all(["" if t is None else str(t) for t in batch[data.text_column]])
    pairs = None
    if data.text_pair_column:
        pairs = nfc_all(["" if t is None else str(t) for t in batch[data.text_pair_column]])
    return texts, pairs


class SequenceTask(Task):
    """A sentence (or sentence-pair) task with one row of logits per text; subclasses say what the logits mean."""

    reads_chunks = True
    pooled_head = True

    # --- what subclasses define ------------------------------------------------------------
    def predictions(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """A batch of logits as what metrics compare against gold labels."""
        raise NotImplementedError

    def gold(self, labels: np.ndarray) -> np.ndarray:
        """Gold labels in the shape `predictions` returns."""
        raise NotImplementedError

    def postprocess(self, logits: np.ndarray, label_names: Sequence[str] | None,
                    options: PostprocessOptions = PostprocessOptions()) -> list[dict[str, Any]]:
        """One JSON-ready answer per row of logits."""
        raise NotImplementedError

    def prediction_columns(self, frame: pd.DataFrame, gold: np.ndarray, pred: np.ndarray, answers: list[dict],
                           label_names: Sequence[str] | None) -> tuple[list[str], list[bool]]:
        """Add gold, predicted (and score, correct) columns to predictions.csv; returns its sort order."""
        raise NotImplementedError

    def extra_artifacts(self, out_dir: Path, gold: np.ndarray, pred: np.ndarray,
                        label_names: Sequence[str] | None) -> list[Path]:
        """Files beside predictions.csv (per-class tables, plots)."""
        return []

    # --- shared --------------------------------------------------------------------------
    def calibrated(self, logits: np.ndarray, settings: TaskSettings) -> np.ndarray:
        """Logits as the scores read them: divided by the model's temperature (task.calibration), if it has one."""
        if self.calibrates and settings.temperature is not None:
            return np.asarray(logits, dtype=np.float64) / settings.temperature
        return logits

    def compute_metrics(self, logits: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
        """Every metric of this task, from raw logits and gold labels."""
        return M.compute_all(self.metrics, self.gold(labels), self.predictions(logits, threshold))

    def check_recipe(self, recipe: Any) -> list[str]:
        problems = super().check_recipe(recipe)
        if recipe.task.long_inputs == "chunk":
            if recipe.data.text_pair_column:
                problems.append("task.long_inputs: chunk reads single texts; it cannot be used with data.text_pair_column")
            if recipe.task.chunk_stride >= recipe.model.max_length // 2:
                problems.append(f"task.chunk_stride ({recipe.task.chunk_stride}) must be under half of model.max_length "
                                f"({recipe.model.max_length}) so each window adds new text")
        return problems

    def tokenize(self, tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int) -> dict:
        """Tokenise texts (and second texts for pair tasks) without padding.

        Padding is left to the collator so batches pad only to their own longest example.
        """
        return tokenizer(nfc_all(texts), nfc_all(pairs) if pairs is not None else None, truncation=True,
                         max_length=max_length)

    def chunk(self, tokenizer: Any, texts: Sequence[str], max_length: int, stride: int) -> Any:
        """Overlapping windows of max_length tokens covering each whole text (`stride` tokens shared)."""
        return tokenizer(nfc_all(texts), truncation=True, max_length=max_length, stride=stride,
                         return_overflowing_tokens=True)

    def features(self, batch: dict[str, list], indices: list[int], ctx: FeatureContext) -> dict:
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

    def token_lengths(self, batch: dict[str, list], data: Any, tokenizer: Any, settings: TaskSettings) -> list[int]:
        texts, pairs = batch_texts(batch, data)
        return [len(ids) for ids in tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]]

    def window_stats(self, rows: dict[str, list], lengths: np.ndarray, data: Any, tokenizer: Any, max_length: int,
                     settings: TaskSettings) -> dict[str, Any] | None:
        if settings.long_inputs != "chunk":
            return None
        step = max(1, max_length - 2 - settings.chunk_stride)
        windows = 1 + np.maximum(0, -(-(lengths - max_length) // step))
        return {"multi_window_share": float((windows > 1).mean()), "windows_max": int(windows.max()), "unit": "texts"}

    def evaluation(self, collected: dict[str, list[np.ndarray]], reference: Reference, settings: TaskSettings,
                   label_names: Sequence[str] | None) -> tuple[dict[str, float], Any]:
        logits = np.concatenate(collected["logits"])
        labels = np.concatenate(collected["labels"])
        if settings.long_inputs == "chunk":
            owners = list(reference.features["example_id"])
            logits = pool_windows(logits, owners, len(reference.raw), settings.chunk_pooling)
            labels = np.asarray(reference.raw["labels"])
        return self.compute_metrics(self.calibrated(logits, settings), labels, settings.threshold), logits

    def metric_inputs(self, outputs: Any, reference: Reference, settings: TaskSettings) -> dict[str, list]:
        """Predicted and gold values in the shapes `predictions` and `gold` give (one per text, windows pooled)."""
        logits = np.asarray(outputs)
        return {"predictions": self.predictions(logits, settings.threshold).tolist(),
                "references": self.gold(np.asarray(reference.raw["labels"])).tolist()}

    def write_artifacts(self, out_dir: Path, reference: Reference, outputs: Any, metrics: dict[str, float],
                        label_names: Sequence[str] | None, settings: TaskSettings) -> list[Path]:
        """predictions.csv (input, gold, predicted, score; mistakes first) and the subclass's extra files."""
        from finetune.reports import artifacts as A

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        raw, data = reference.raw, reference.data
        logits = self.calibrated(np.asarray(outputs), settings)
        gold = self.gold(np.asarray(raw["labels"]))
        pred = self.predictions(logits, settings.threshold)
        answers = self.postprocess(logits, label_names, PostprocessOptions(threshold=settings.threshold))
        frame = pd.DataFrame({"text": list(raw[data.text_column])})
        if data.text_pair_column:
            frame["text_pair"] = list(raw[data.text_pair_column])
        order, ascending = self.prediction_columns(frame, gold, pred, answers, label_names)
        written = [A.write_predictions(out_dir / "predictions.csv", frame, order, ascending)]
        return written + self.extra_artifacts(out_dir, gold, pred, label_names)

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

    def encode(self, tokenizer: Any, inputs: list[Any], text_pair: bool, max_length: int,
               settings: TaskSettings) -> Encoded:
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

    def answer(self, inputs: list[Any], encoded: Encoded, rows: Sequence[np.ndarray], label_names: Sequence[str] | None,
               settings: TaskSettings, options: PostprocessOptions) -> list[dict[str, Any]]:
        logits = np.stack(list(rows))
        if settings.long_inputs == "chunk":
            logits = pool_windows(logits, encoded.owner, len(inputs), settings.chunk_pooling)
        answers = self.postprocess(self.calibrated(logits, settings), label_names, options)
        for answer, was_truncated in zip(answers, encoded.truncated):
            answer["truncated"] = was_truncated
        return answers
