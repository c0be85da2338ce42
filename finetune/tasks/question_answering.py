"""Extractive question answering (SQuAD v1.1 style): overlapping context windows, best span across windows.

A context longer than `model.max_length` is split into windows that overlap by `task.doc_stride`
tokens. Training teaches each window the answer's start and end tokens (or [CLS] when the answer
is not inside it); evaluation and serving score every (start, end) pair among each window's
`n_best_size` best starts and ends, up to `max_answer_length` tokens, and keep the best over all
windows. Exact match and F1 follow the SQuAD v1.1 definitions (finetune.tasks.metrics.squad_scores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import finetune.tasks.metrics as M
from finetune.tasks.base import (
    Encoded, FeatureContext, InputError, PostprocessOptions, Reference, Task, TaskSettings, nfc_all, nfc_spans,
    original_span, softmax,
)

MAX_WINDOWS_PER_INPUT = 64
"""Serving: a context needing more windows than this is refused (422) rather than tying up the model."""


def tokenize_windows(tokenizer: Any, questions: Sequence[str], contexts: Sequence[str], max_length: int,
                     doc_stride: int) -> Any:
    """Question + context windows: the context is cut into overlapping pieces, the question repeated in each.

    Both are tokenised in NFC (`nfc`); the context's offsets are mapped back to the context as given, so answer
    positions (answer_start, the spans served) stay offsets into the caller's own text."""
    normalised = [nfc_spans(str(c)) for c in contexts]
    encoded = tokenizer(
        [q.lstrip() for q in nfc_all(questions)],  # leading spaces make some tokenizers fail to truncate the context
        [text for text, _ in normalised],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    for i, owner in enumerate(encoded["overflow_to_sample_mapping"]):
        spans = normalised[owner][1]
        if spans is not None:
            encoded["offset_mapping"][i] = [original_span(spans, *o) if s == 1 else o
                                            for o, s in zip(encoded["offset_mapping"][i], encoded.sequence_ids(i))]
    return encoded


def context_offsets(encoded: Any, i: int, context: str) -> list[tuple[int, int] | None]:
    """Character offsets of window i's tokens, None for everything that is not context (question, specials).

    A token's span starts at its first character that is not whitespace: SentencePiece pieces (XLM-R, DeBERTa-v3)
    carry the space before a word, so an answer would otherwise start with it."""
    sequence_ids = encoded.sequence_ids(i)
    out: list[tuple[int, int] | None] = []
    for (start, end), sequence in zip(encoded["offset_mapping"][i], sequence_ids):
        if sequence != 1:
            out.append(None)
            continue
        while start < end - 1 and context[start].isspace():
            start += 1
        out.append((start, end))
    return out


def answer_positions(offsets: Sequence[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions of the answer's first and last token in a window, or (0, 0) ([CLS]) if not wholly inside."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context:
        return 0, 0
    first, last = context[0], context[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return 0, 0
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def best_span(windows: Sequence[tuple[np.ndarray, np.ndarray, Sequence[tuple[int, int] | None]]], n_best_size: int,
              max_answer_length: int) -> tuple[int, int, float] | None:
    """The best answer span over all windows of one question: (start char, end char, probability), or None.

    Candidates are ranked by start logit + end logit (as in the BERT paper); the probability reported is
    the window's softmax over context positions for the start times that for the end.
    """
    best: tuple[float, int, int, float] | None = None
    for start_logits, end_logits, offsets in windows:
        n = len(offsets)
        start_logits, end_logits = np.asarray(start_logits[:n], dtype=np.float64), np.asarray(end_logits[:n], dtype=np.float64)
        is_context = np.array([o is not None for o in offsets])
        if not is_context.any():
            continue
        masked_start = np.where(is_context, start_logits, -np.inf)
        masked_end = np.where(is_context, end_logits, -np.inf)
        starts = np.argsort(-masked_start, kind="stable")[:n_best_size]
        ends = np.argsort(-masked_end, kind="stable")[:n_best_size]
        p_start, p_end = softmax(masked_start), softmax(masked_end)
        for s in starts:
            if offsets[s] is None:
                continue
            for e in ends:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = start_logits[s] + end_logits[e]
                if best is None or score > best[0]:
                    best = (score, offsets[s][0], offsets[e][1], float(p_start[s] * p_end[e]))
    return None if best is None else (best[1], best[2], best[3])


class QuestionAnsweringTask(Task):
    """Extractive QA: the answer is a span of the context."""

    name = "question_answering"
    description = "extractive QA over a context (SQuAD v1.1 form; long contexts in overlapping windows; EM and F1)"
    metrics = M.named("f1", "exact_match")
    default_metric = "f1"
    has_label_names = False
    auto_model = "AutoModelForQuestionAnswering"
    # mlflow 3.17 cannot build a question-answering pipeline from these components, so pyfunc only.
    pipeline_task = None
    target_keys = ("start_positions", "end_positions")
    keep_raw_columns = frozenset()
    eval_only_columns = ("example_id", "offset_mapping")
    per_token = True
    structured_inputs = True
    reads_text_pair = False

    def check_recipe(self, recipe: Any) -> list[str]:
        problems = super().check_recipe(recipe)
        if recipe.task.doc_stride >= recipe.model.max_length // 2:
            problems.append(f"task.doc_stride ({recipe.task.doc_stride}) must be under half of model.max_length "
                            f"({recipe.model.max_length}) so each window adds new context")
        return problems

    def encode_labels(self, values: Sequence[Any], label_names: Sequence[str] | None, by_position: bool,
                      data: Any) -> None:
        return None  # the answers are read from their column while tokenising (`features`)

    def loss(self, outputs: Any, targets: dict[str, Any], settings: TaskSettings) -> Any:
        import torch.nn.functional as F

        # As transformers' QA heads: positions outside the window are clamped to one ignored index.
        ignored = outputs.start_logits.size(1)
        starts = targets["start_positions"].view(-1).clamp(0, ignored)
        ends = targets["end_positions"].view(-1).clamp(0, ignored)
        return (F.cross_entropy(outputs.start_logits, starts, ignore_index=ignored)
                + F.cross_entropy(outputs.end_logits, ends, ignore_index=ignored)) / 2

    def columns(self, data: Any) -> dict[str, str]:
        return {"data.question_column": data.question_column, "data.context_column": data.context_column,
                "data.answers_column": data.answers_column}

    def num_labels(self, label_names: Sequence[str] | None) -> None:
        return None  # the head's size is fixed (start and end / one score per choice)

    def features(self, batch: dict[str, list], indices: list[int], ctx: FeatureContext) -> dict:
        data = ctx.data
        encoded = tokenize_windows(ctx.tokenizer, batch[data.question_column], batch[data.context_column],
                                   ctx.max_length, ctx.settings.doc_stride)
        owners = encoded.pop("overflow_to_sample_mapping")
        starts, ends, example_ids, offsets_column = [], [], [], []
        for i, owner in enumerate(owners):
            offsets = context_offsets(encoded, i, batch[data.context_column][owner])
            answers = batch[data.answers_column][owner] or {}
            texts, answer_starts = answers.get("text") or [], answers.get("answer_start") or []
            if texts:
                start, end = answer_positions(offsets, answer_starts[0], answer_starts[0] + len(texts[0]))
            else:
                start = end = 0
            starts.append(start)
            ends.append(end)
            example_ids.append(indices[owner])
            offsets_column.append(offsets)
        encoded.pop("offset_mapping")
        encoded["start_positions"], encoded["end_positions"] = starts, ends
        if not ctx.train:  # post-processing maps each window back to its question and characters
            encoded["example_id"], encoded["offset_mapping"] = example_ids, offsets_column
        return encoded

    def token_lengths(self, batch: dict[str, list], data: Any, tokenizer: Any, settings: TaskSettings) -> list[int]:
        encoded = tokenizer(nfc_all(batch[data.question_column]), nfc_all(batch[data.context_column]), truncation=False,
                            verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def window_stats(self, rows: dict[str, list], lengths: np.ndarray, data: Any, tokenizer: Any, max_length: int,
                     settings: TaskSettings) -> dict[str, Any] | None:
        questions = [len(ids) for ids in tokenizer(nfc_all(rows[data.question_column]), add_special_tokens=False)["input_ids"]]
        windows = np.array(self.windows_needed(lengths, max_length, settings.doc_stride, questions))
        return {"multi_window_share": float((windows > 1).mean()), "windows_max": int(windows.max()), "unit": "contexts"}

    def windows_needed(self, lengths: Sequence[int], max_length: int, doc_stride: int, question_lengths: Sequence[int]) -> list[int]:
        """How many windows each (question, context) of the given token lengths is split into."""
        counts = []
        for total, question in zip(lengths, question_lengths):
            room = max_length - question - 3  # [CLS] question [SEP] context [SEP]
            context = total - question - 3
            counts.append(1 if context <= room else 1 + -(-(context - room) // max(1, room - doc_stride)))
        return counts

    def eval_tensors(self, outputs: Any, batch: dict) -> dict:
        return {"start_logits": outputs.start_logits, "end_logits": outputs.end_logits}

    def evaluation(self, collected: dict[str, list[np.ndarray]], reference: Reference, settings: TaskSettings,
                   label_names: Sequence[str] | None) -> tuple[dict[str, float], Any]:
        starts = [row for batch in collected["start_logits"] for row in batch]
        ends = [row for batch in collected["end_logits"] for row in batch]
        by_example: dict[int, list] = {}
        for start, end, example, offsets in zip(starts, ends, reference.features["example_id"], reference.features["offset_mapping"]):
            by_example.setdefault(example, []).append((start, end, [tuple(o) if o is not None else None for o in offsets]))
        contexts, answers = reference.raw[reference.data.context_column], reference.raw[reference.data.answers_column]
        predictions, golds = [], []
        for example in range(len(reference.raw)):
            span = best_span(by_example.get(example, []), settings.n_best_size, settings.max_answer_length)
            predictions.append(contexts[example][span[0]:span[1]] if span else "")
            golds.append(list((answers[example] or {}).get("text") or []))
        return M.squad_scores(predictions, golds), {"predicted": predictions, "gold": golds}

    def collect(self, rows: Sequence[np.ndarray], features: Sequence[dict[str, Any]]) -> dict[str, list]:
        rows = [np.asarray(r) for r in rows]  # (tokens, 2): start and end logits (`output_array`)
        return {"start_logits": [[r[:, 0] for r in rows]], "end_logits": [[r[:, 1] for r in rows]]}

    def metric_inputs(self, outputs: Any, reference: Reference, settings: TaskSettings) -> dict[str, list]:
        """SQuAD's form: predictions {id, prediction_text}, references {id, answers: {text, answer_start}}."""
        answers = reference.raw[reference.data.answers_column]
        predictions = [{"id": str(i), "prediction_text": p} for i, p in enumerate(outputs["predicted"])]
        references = [{"id": str(i), "answers": {"text": list((a or {}).get("text") or []),
                                                 "answer_start": [int(s) for s in (a or {}).get("answer_start") or []]}}
                      for i, a in enumerate(answers)]
        return {"predictions": predictions, "references": references}

    def write_artifacts(self, out_dir: Path, reference: Reference, outputs: Any, metrics: dict[str, float],
                        label_names: Sequence[str] | None, settings: TaskSettings) -> list[Path]:
        """predictions.csv: question, predicted answer, gold answers, exact match and F1, worst first."""
        from finetune.reports import artifacts as A

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        predicted, gold = outputs["predicted"], outputs["gold"]
        frame = pd.DataFrame({"question": reference.raw[reference.data.question_column], "predicted": predicted,
                              "gold": [" | ".join(g) for g in gold]})
        frame["exact_match"] = [max((M.normalize_answer(p) == M.normalize_answer(a) for a in g or [""]), default=False)
                                for p, g in zip(predicted, gold)]
        frame["f1"] = [max((M.squad_f1(p, a) for a in g or [""]), default=0.0) for p, g in zip(predicted, gold)]
        return [A.write_predictions(out_dir / "predictions.csv", frame, ["f1"], [True])]

    def parse_inputs(self, inputs: Sequence[Any], text_pair: bool) -> list[Any]:
        for i, item in enumerate(inputs):
            if not (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("context"), str)):
                raise InputError(i, 'this model answers questions about a text: give {"question": "...", "context": "..."}')
            extra = set(item) - {"question", "context"}
            if extra:
                raise InputError(i, f"unknown field(s) {sorted(extra)}; allowed: question, context")
            if not item["question"].strip() or not item["context"].strip():
                raise InputError(i, "empty question or context")
        return list(inputs)

    def input_columns(self, data: Any, text_pair: bool) -> dict[str, str | None]:
        return {"data.question_column": data.question_column, "data.context_column": data.context_column}

    def inputs_from_rows(self, columns: dict[str, list], data: Any, text_pair: bool) -> list[Any]:
        return [{"question": "" if q is None else str(q), "context": "" if c is None else str(c)}
                for q, c in zip(columns[data.question_column], columns[data.context_column])]

    def encode(self, tokenizer: Any, inputs: list[Any], text_pair: bool, max_length: int, settings: TaskSettings) -> Encoded:
        questions = [x["question"] for x in inputs]
        question_lengths = [len(ids) for ids in tokenizer(nfc_all(questions), add_special_tokens=False)["input_ids"]]
        for i, n in enumerate(question_lengths):
            if n + 3 + settings.doc_stride >= max_length:
                raise InputError(i, f"the question is {n} tokens; this model needs it under "
                                    f"{max_length - 3 - settings.doc_stride} to leave room for the context")
        encoded = tokenize_windows(tokenizer, questions, [x["context"] for x in inputs], max_length, settings.doc_stride)
        owners = list(encoded["overflow_to_sample_mapping"])
        for i in range(len(inputs)):
            if owners.count(i) > MAX_WINDOWS_PER_INPUT:
                raise InputError(i, f"the context needs {owners.count(i)} windows of {max_length} tokens; "
                                    f"at most {MAX_WINDOWS_PER_INPUT} per input")
        model_keys = [k for k in encoded if k not in ("offset_mapping", "overflow_to_sample_mapping")]
        features = [{k: encoded[k][j] for k in model_keys} for j in range(len(owners))]
        meta = [context_offsets(encoded, j, inputs[owners[j]]["context"]) for j in range(len(owners))]
        return Encoded(features, owners, meta, [False] * len(inputs))

    def output_array(self, outputs: Any) -> Any:
        import torch

        return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)

    def answer(self, inputs: list[Any], encoded: Encoded, rows: Sequence[np.ndarray], label_names: Sequence[str] | None,
               settings: TaskSettings, options: PostprocessOptions) -> list[dict[str, Any]]:
        windows: list[list] = [[] for _ in inputs]
        for owner, offsets, row in zip(encoded.owner, encoded.meta, rows):
            windows[owner].append((row[:, 0], row[:, 1], offsets))
        answers = []
        for item, item_windows in zip(inputs, windows):
            span = best_span(item_windows, settings.n_best_size, settings.max_answer_length)
            if span is None:
                answers.append({"answer": "", "start": 0, "end": 0, "score": 0.0, "truncated": False})
            else:
                start, end, score = span
                answers.append({"answer": item["context"][start:end], "start": start, "end": end, "score": score,
                                "truncated": False})
        return answers

    def label_counts(self, split: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
        """Questions (raw split) or windows and how many of them contain the answer (features)."""
        if "start_positions" in split.column_names:
            starts = np.asarray(split["start_positions"])
            return {"windows": int(len(starts)), "windows_with_answer": int((starts > 0).sum())}
        return {"questions": len(split)}

    def example_input(self, text_pair: bool) -> Any:
        return {"question": "Where is the Eiffel Tower?", "context": "The Eiffel Tower is in Paris, France."}

    def format_answer(self, item: Any, answer: dict[str, Any]) -> str:
        return f"{answer['answer'] or '-'}\t{answer['score']:.4f}\t{item['question']}"


QUESTION_ANSWERING = QuestionAnsweringTask()
