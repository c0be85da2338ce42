"""Multiple choice (SWAG style): a context, an optional start of the answer, N candidate endings, one correct.

Each (context, start + ending) pair is encoded on its own and the model scores every pair with one
shared head; a softmax over an example's pairs gives the choice. Because the pairs are scored
independently, the server can batch pairs of different requests together and accept any number of
choices per input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import finetune.tasks.metrics as M
from finetune.tasks.base import (
    Encoded, FeatureContext, InputError, LabelEncoding, PostprocessOptions, Reference, Task, TaskSettings, nfc, softmax,
)

MAX_CHOICES = 32


def choice_pairs(context: str, start: str | None, choices: Sequence[str]) -> tuple[list[str], list[str]]:
    """The (first, second) texts of every choice: the context, and the start of the answer joined to the ending."""
    prefix = f"{start.strip()} " if start and start.strip() else ""
    return [nfc(context)] * len(choices), [nfc(f"{prefix}{c}") for c in choices]


class MultipleChoiceTask(Task):
    """Pick the correct ending (or answer) among N."""

    name = "multiple_choice"
    description = "pick the correct ending among N (SWAG style: context, optional start, choice columns; accuracy)"
    metrics = M.named("accuracy")
    default_metric = "accuracy"
    has_label_names = False
    auto_model = "AutoModelForMultipleChoice"
    pipeline_task = None
    structured_inputs = True
    reads_choice_columns = True
    pooled_head = True

    def check_recipe(self, recipe: Any) -> list[str]:
        problems = super().check_recipe(recipe)
        if not recipe.data.choice_columns:
            problems.append(f"data.choice_columns is required for task.type {self.name} (the columns of the candidate "
                            "endings, e.g. [ending0, ending1, ending2, ending3])")
        return problems

    def loss(self, outputs: Any, targets: dict[str, Any], settings: TaskSettings) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(outputs.logits, targets["labels"].view(-1))

    def columns(self, data: Any) -> dict[str, str]:
        wanted = {"data.text_column": data.text_column, "data.label_column": data.label_column}
        if data.text_pair_column:
            wanted["data.text_pair_column"] = data.text_pair_column
        for i, column in enumerate(data.choice_columns or []):
            wanted[f"data.choice_columns[{i}]"] = column
        return wanted

    def choices_of(self, batch: dict[str, list], data: Any) -> list[list[str]]:
        """The candidate endings of each row: one column per choice, or one column holding a list."""
        columns = data.choice_columns
        if len(columns) == 1:
            return [[str(c) for c in row] for row in batch[columns[0]]]
        return [[str(batch[c][i]) for c in columns] for i in range(len(batch[columns[0]]))]

    def encode_labels(self, values: Sequence[Any], label_names: Sequence[str] | None, by_position: bool,
                      data: Any) -> LabelEncoding:
        import datasets

        labels, bad = [], []
        for v in values:
            as_int = int(v) if isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().isdigit()) else None
            if as_int is None or as_int < 0:
                bad.append(v)
            labels.append(as_int if as_int is not None else 0)
        return LabelEncoding(labels, bad, datasets.Value("int64"), "a choice index 0, 1, ...")

    def num_labels(self, label_names: Sequence[str] | None) -> None:
        return None  # the head's size is fixed (start and end / one score per choice)

    def features(self, batch: dict[str, list], indices: list[int], ctx: FeatureContext) -> dict:
        data = ctx.data
        contexts = [str(c) for c in batch[data.text_column]]
        starts = [str(s) for s in batch[data.text_pair_column]] if data.text_pair_column else [None] * len(contexts)
        choices = self.choices_of(batch, data)
        firsts, seconds, sizes = [], [], []
        for context, start, options in zip(contexts, starts, choices):
            a, b = choice_pairs(context, start, options)
            firsts += a
            seconds += b
            sizes.append(len(options))
        if len(set(sizes)) > 1:
            raise ValueError(f"multiple choice rows must all have the same number of choices, found {sorted(set(sizes))}")
        flat = ctx.tokenizer(firsts, seconds, truncation=True, max_length=ctx.max_length)
        n = sizes[0] if sizes else 0
        encoded = {k: [v[i:i + n] for i in range(0, len(v), n)] for k, v in flat.items()}
        encoded["labels"] = batch["labels"]
        for label, size in zip(batch["labels"], sizes):
            if label >= size:
                raise ValueError(f"data.label_column: label {label} but only {size} choices")
        return encoded

    def token_lengths(self, batch: dict[str, list], data: Any, tokenizer: Any, settings: TaskSettings) -> list[int]:
        contexts = [str(c) for c in batch[data.text_column]]
        starts = [str(s) for s in batch[data.text_pair_column]] if data.text_pair_column else [None] * len(contexts)
        lengths = []
        for context, start, options in zip(contexts, starts, self.choices_of(batch, data)):
            a, b = choice_pairs(context, start, options)
            lengths.append(max(len(ids) for ids in tokenizer(a, b, truncation=False, verbose=False)["input_ids"]))
        return lengths

    def collator(self, tokenizer: Any, pad_to_multiple_of: int | None, settings: TaskSettings | None = None) -> Any:
        from transformers import DataCollatorForMultipleChoice

        collate = DataCollatorForMultipleChoice(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

        def collate_with_or_without_labels(features: list[dict]) -> dict:
            # transformers' collator insists on labels; served inputs have none.
            if features and "labels" in features[0]:
                return collate(features)
            batch = collate([{**f, "labels": 0} for f in features])
            batch.pop("labels")
            return batch

        return collate_with_or_without_labels

    def evaluation(self, collected: dict[str, list[np.ndarray]], reference: Reference, settings: TaskSettings,
                   label_names: Sequence[str] | None) -> tuple[dict[str, float], Any]:
        logits = np.concatenate(collected["logits"])
        gold = np.concatenate(collected["labels"]).astype(np.int64)
        return {"accuracy": M.accuracy(gold, logits.argmax(axis=-1))}, logits

    def metric_inputs(self, outputs: Any, reference: Reference, settings: TaskSettings) -> dict[str, list]:
        """The chosen and the correct choice indices."""
        return {"predictions": np.asarray(outputs).argmax(axis=-1).tolist(),
                "references": [int(v) for v in reference.raw["labels"]]}

    def write_artifacts(self, out_dir: Path, reference: Reference, outputs: Any, metrics: dict[str, float],
                        label_names: Sequence[str] | None, settings: TaskSettings) -> list[Path]:
        """predictions.csv: context, choices, gold, predicted and score; mistakes first, the surest first."""
        from finetune.reports import artifacts as A

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        data, raw = reference.data, reference.raw
        probs = softmax(np.asarray(outputs, dtype=np.float64))
        rows = raw[:]
        gold = [int(v) for v in rows[data.label_column]] if data.label_column in rows else list(raw["labels"])
        frame = pd.DataFrame({"context": rows[data.text_column], "choices": [" | ".join(c) for c in self.choices_of(rows, data)],
                              "gold": gold, "predicted": probs.argmax(axis=1), "score": probs.max(axis=1)})
        frame["correct"] = frame["gold"] == frame["predicted"]
        return [A.write_predictions(out_dir / "predictions.csv", frame, ["correct", "score"], [True, False])]

    def parse_inputs(self, inputs: Sequence[Any], text_pair: bool) -> list[Any]:
        shape = '{"context": "...", "choices": ["...", "..."]} (optionally "start": the beginning of every answer)'
        for i, item in enumerate(inputs):
            if not isinstance(item, dict) or not isinstance(item.get("context"), str) or not isinstance(item.get("choices"), list):
                raise InputError(i, f"this model picks one of several choices: give {shape}")
            extra = set(item) - {"context", "choices", "start"}
            if extra:
                raise InputError(i, f"unknown field(s) {sorted(extra)}; allowed: context, choices, start")
            choices = item["choices"]
            if not 2 <= len(choices) <= MAX_CHOICES or not all(isinstance(c, str) and c.strip() for c in choices):
                raise InputError(i, f"choices must be 2 to {MAX_CHOICES} non-empty strings")
            if not item["context"].strip() or not isinstance(item.get("start", ""), str):
                raise InputError(i, "context must be a non-empty string, start a string")
        return list(inputs)

    def input_columns(self, data: Any, text_pair: bool) -> dict[str, str | None]:
        wanted = {"data.text_column": data.text_column}
        if data.text_pair_column:
            wanted["data.text_pair_column"] = data.text_pair_column
        if not data.choice_columns:
            wanted["data.choice_columns"] = None
        for i, column in enumerate(data.choice_columns or []):
            wanted[f"data.choice_columns[{i}]"] = column
        return wanted

    def inputs_from_rows(self, columns: dict[str, list], data: Any, text_pair: bool) -> list[Any]:
        contexts = ["" if c is None else str(c) for c in columns[data.text_column]]
        starts = columns[data.text_pair_column] if data.text_pair_column else [None] * len(contexts)
        inputs = []
        for context, start, choices in zip(contexts, starts, self.choices_of(columns, data)):
            item: dict[str, Any] = {"context": context, "choices": choices}
            if start is not None and str(start).strip():
                item["start"] = str(start)
            inputs.append(item)
        return inputs

    def encode(self, tokenizer: Any, inputs: list[Any], text_pair: bool, max_length: int, settings: TaskSettings) -> Encoded:
        # One feature per (input, choice) pair, shaped as a one-choice example: the head scores pairs
        # independently, so pairs from different requests (with different numbers of choices) batch together.
        firsts, seconds, owner = [], [], []
        for i, item in enumerate(inputs):
            a, b = choice_pairs(item["context"], item.get("start"), item["choices"])
            firsts += a
            seconds += b
            owner += [i] * len(a)
        encoded = tokenizer(firsts, seconds, truncation=True, max_length=max_length + 1)
        cut = [len(ids) > max_length for ids in encoded["input_ids"]]
        if any(cut):
            encoded = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
        features = [{k: [encoded[k][j]] for k in encoded} for j in range(len(firsts))]
        truncated = [False] * len(inputs)
        for j, i in enumerate(owner):
            truncated[i] = truncated[i] or cut[j]
        return Encoded(features, owner, [None] * len(features), truncated)

    def answer(self, inputs: list[Any], encoded: Encoded, rows: Sequence[np.ndarray], label_names: Sequence[str] | None,
               settings: TaskSettings, options: PostprocessOptions) -> list[dict[str, Any]]:
        scores: list[list[float]] = [[] for _ in inputs]
        for owner, row in zip(encoded.owner, rows):
            scores[owner].append(float(np.asarray(row).reshape(-1)[0]))
        answers = []
        for item, logits, was_truncated in zip(inputs, scores, encoded.truncated):
            probs = softmax(np.asarray(logits, dtype=np.float64))
            best = int(probs.argmax())
            answers.append({"choice": best, "text": item["choices"][best], "score": float(probs[best]),
                            "scores": [float(p) for p in probs], "truncated": was_truncated})
        return answers

    def label_counts(self, split: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
        """How often each choice position is the correct one."""
        counts = np.bincount(np.asarray(split["labels"], dtype=int))
        return {f"choice {i}": int(c) for i, c in enumerate(counts)}

    def example_input(self, text_pair: bool) -> Any:
        return {"context": "The man lit the fire.", "choices": ["It got warm.", "It started to snow."]}

    def format_answer(self, item: Any, answer: dict[str, Any]) -> str:
        return f"{answer['choice']}\t{answer['score']:.4f}\t{answer['text']}"


MULTIPLE_CHOICE = MultipleChoiceTask()
