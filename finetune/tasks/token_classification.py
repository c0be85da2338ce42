"""Token classification (NER): word tags aligned to word pieces, entity-level scores, entities with character spans.

Training reads words and one tag per word (CoNLL files or a hub data set with token and tag
columns). Only the first word piece of a word carries its tag unless `task.label_all_tokens` is set;
evaluation always scores one tag per word, so the metric means the same with either setting.
Serving reads plain text and answers with entities: type, text, character start and end, score.

Words are the same everywhere (`task.word_split`): serving cuts a text into words by the rule, and training and
evaluation cut the data set's words by the same rule (a word the rule splits, such as CoNLL's "U.S." or "2-1"
under `punctuation`, becomes several, the first with the word's tag and the others continuing it: B-X -> I-X), so
a text made of an evaluation sentence's words gives the model exactly the tokens evaluation gave it. Each word is
then tokenised as it reads after a space in running text (`encode_words`), whatever the tokenizer: byte-level BPE
(RoBERTa, ModernBERT, EuroBERT) and SentencePiece vocabularies (XLM-R, DeBERTa-v3) mark that space in the piece,
WordPiece ignores it. An entity's start and end are its first and last word's characters in the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import finetune.tasks.labels as L
import finetune.tasks.metrics as M
from finetune.tasks.base import (
    IGNORE_INDEX, Encoded, FeatureContext, InputError, LabelEncoding, PostprocessOptions, Reference, Task,
    TaskSettings, nfc, softmax,
)


def tag_order(tags: set[str]) -> list[str]:
    """A readable, stable label order: O first, then by entity type, B- before I-."""
    def key(tag: str) -> tuple:
        prefix, _, kind = tag.partition("-")
        return (tag != "O", kind or prefix, prefix)

    return sorted(tags, key=key)


def continuation_tags(label_names: Sequence[str]) -> list[int]:
    """For each tag id, the id a continuation word piece gets when all pieces are labelled (B-X -> I-X)."""
    index = {name: i for i, name in enumerate(label_names)}
    return [index.get("I-" + name[2:], i) if name.startswith("B-") else i for i, name in enumerate(label_names)]


def align_labels(word_ids: Sequence[int | None], word_tags: Sequence[int], label_all_tokens: bool,
                 continuation: Sequence[int]) -> list[int]:
    """Tag ids per word piece: the word's tag on its first piece; the others ignored (or tagged as continuation)."""
    aligned, previous = [], None
    for word in word_ids:
        if word is None:
            aligned.append(IGNORE_INDEX)
        elif word != previous:
            aligned.append(int(word_tags[word]))
        else:
            aligned.append(int(continuation[word_tags[word]]) if label_all_tokens else IGNORE_INDEX)
        previous = word
    return aligned


def split_words(text: str, rule: str) -> list[tuple[str, tuple[int, int]]]:
    """The words of a text and their character spans, by `task.word_split`: `punctuation` cuts at whitespace and
    makes every punctuation character a word of its own (BERT's pre-tokenizer, which CoNLL's words mostly follow);
    `whitespace` cuts at whitespace only."""
    from tokenizers.pre_tokenizers import BertPreTokenizer, WhitespaceSplit

    splitter = BertPreTokenizer() if rule == "punctuation" else WhitespaceSplit()
    return [(word, (start, end)) for word, (start, end) in splitter.pre_tokenize_str(text)]


def resplit(words: Sequence[str], tags: Sequence[int], rule: str, continuation: Sequence[int]) -> tuple[list[str], list[int]]:
    """A labelled sentence's words cut by the serving rule (`split_words`): a word that becomes several keeps its tag
    on the first and the continuation tag (B-X -> I-X) on the rest; a word with nothing in it is dropped."""
    out_words: list[str] = []
    out_tags: list[int] = []
    for word, tag in zip(words, tags):
        pieces = [w for w, _ in split_words(str(word), rule)]
        out_words += pieces
        out_tags += [int(tag)] + [int(continuation[tag])] * (len(pieces) - 1) if pieces else []
    return out_words, out_tags


def encode_words(tokenizer: Any, rows: Sequence[Sequence[str]], max_length: int | None, **kwargs: Any) -> Any:
    """Tokenise sentences given as words, each word as it reads after a space in running text (see the module
    docstring); `max_length` None: untruncated. The one tokenisation of words in training, validation and serving."""
    spaced = [[" " + nfc(word) for word in row] for row in rows]  # per word: spans stay the given text's
    if max_length is None:
        return tokenizer(spaced, is_split_into_words=True, truncation=False, verbose=False, **kwargs)
    return tokenizer(spaced, is_split_into_words=True, truncation=True, max_length=max_length, **kwargs)


def merge_entities(text: str, word_ids: Sequence[int | None], spans: Sequence[tuple[int, int]],
                   tags: Sequence[str], scores: Sequence[float]) -> list[dict[str, Any]]:
    """Entities from per-piece tags: each word takes its first piece's tag and score, and the entities are read from
    the words' tags exactly as the metric reads them (`finetune.tasks.metrics.entity_scores`: seqeval, strict IOB2,
    so B-X starts an entity, I-X continues it, and an I- tag that continues nothing is no entity), so the entities
    served are the ones evaluation counted.

    `spans` are the words' character spans in `text` (`split_words`); an entity runs from its first word's start
    to its last word's end. Its score is the mean of its words' scores.
    """
    from seqeval.scheme import IOB2, Entities

    words: list[tuple[str, float, int, int]] = []
    previous = None
    for piece, word in enumerate(word_ids):
        if word is None or word == previous:
            continue
        start, end = spans[word]
        words.append((tags[piece], float(scores[piece]), start, end))
        previous = word
    entities = []
    for found in Entities([[w[0] for w in words]], IOB2, suffix=False).entities[0]:
        start, end = words[found.start][2], words[found.end - 1][3]
        entities.append({"type": found.tag, "text": text[start:end], "start": start, "end": end,
                         "score": float(np.mean([w[1] for w in words[found.start:found.end]]))})
    return entities


class TokenClassificationTask(Task):
    """Named-entity recognition and other per-word tagging."""

    name = "token_classification"
    description = "per-word tagging such as NER (IOB2 tags; entity-level precision, recall and F1 with seqeval)"
    metrics = M.named("f1", "precision", "recall", "accuracy")
    default_metric = "f1"
    auto_model = "AutoModelForTokenClassification"
    pipeline_task = "token-classification"
    keep_raw_columns = frozenset()
    per_token = True
    reads_text_pair = False

    def columns(self, data: Any) -> dict[str, str]:
        return {"data.text_column": data.text_column, "data.label_column": data.label_column}

    def label_names_from(self, values: Sequence[Any], data: Any) -> list[str]:
        tags = {str(t) for row in values for t in (row or [])}
        L.at_least_two(tags, data, what="tag(s)", needs="tagging")
        return tag_order(tags)

    def encode_labels(self, values: Sequence[Any], label_names: Sequence[str] | None, by_position: bool,
                      data: Any) -> LabelEncoding:
        import datasets

        index = {name: i for i, name in enumerate(label_names)}
        labels, bad = [], []
        for row in values:
            ids = []
            for tag in row or []:
                if isinstance(tag, str) and tag in index:
                    ids.append(index[tag])
                elif by_position and isinstance(tag, (int, np.integer)) and 0 <= tag < len(label_names):
                    ids.append(int(tag))
                else:
                    bad.append(tag)
                    ids.append(0)
            labels.append(ids)
        return LabelEncoding(labels, bad, datasets.Sequence(datasets.Value("int64")),
                             L.allowed_classes(label_names, by_position))

    def loss(self, outputs: Any, targets: dict[str, Any], settings: TaskSettings) -> Any:
        import torch.nn.functional as F

        logits = outputs.logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets["labels"].view(-1), ignore_index=IGNORE_INDEX)

    feature_settings = ("word_split",)

    def features(self, batch: dict[str, list], indices: list[int], ctx: FeatureContext) -> dict:
        continuation = continuation_tags(ctx.label_names)
        rows = [resplit([str(w) for w in words], tags, ctx.settings.word_split, continuation)
                for words, tags in zip(batch[ctx.data.text_column], batch["labels"])]
        encoded = encode_words(ctx.tokenizer, [words for words, _ in rows], ctx.max_length)
        # Evaluation scores one tag per word, so only training labels continuation pieces.
        label_all = ctx.settings.label_all_tokens and ctx.train
        encoded["labels"] = [align_labels(encoded.word_ids(i), tags, label_all, continuation)
                             for i, (_, tags) in enumerate(rows)]
        return encoded

    def token_lengths(self, batch: dict[str, list], data: Any, tokenizer: Any, settings: TaskSettings) -> list[int]:
        rows = [[w for word in row for w, _ in split_words(str(word), settings.word_split)]
                for row in batch[data.text_column]]
        return [len(ids) for ids in encode_words(tokenizer, rows, None)["input_ids"]]

    def collator(self, tokenizer: Any, pad_to_multiple_of: int | None, settings: TaskSettings | None = None) -> Any:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def eval_tensors(self, outputs: Any, batch: dict) -> dict:
        return {"predictions": outputs.logits.argmax(dim=-1), "labels": batch["labels"]}

    def evaluation(self, collected: dict[str, list[np.ndarray]], reference: Reference, settings: TaskSettings,
                   label_names: Sequence[str] | None) -> tuple[dict[str, float], Any]:
        assert label_names is not None
        gold, predicted = [], []
        for predictions, labels in zip(collected["predictions"], collected["labels"]):
            for pred_row, gold_row in zip(predictions, labels):
                words = gold_row != IGNORE_INDEX
                gold.append([label_names[i] for i in gold_row[words]])
                predicted.append([label_names[i] for i in pred_row[words]])
        return M.entity_scores(gold, predicted), {"gold": gold, "predicted": predicted}

    def collect(self, rows: Sequence[np.ndarray], features: Sequence[dict[str, Any]]) -> dict[str, list]:
        # One batch per feature: rows differ in length, and `evaluation` reads each row against its own labels.
        return {"predictions": [[np.asarray(r).argmax(axis=-1) for r in rows]],
                "labels": [[np.asarray(f["labels"]) for f in features]]}

    def metric_inputs(self, outputs: Any, reference: Reference, settings: TaskSettings) -> dict[str, list]:
        """Tag lists per sentence, one tag per word (seqeval's form)."""
        return {"predictions": outputs["predicted"], "references": outputs["gold"]}

    def write_artifacts(self, out_dir: Path, reference: Reference, outputs: Any, metrics: dict[str, float],
                        label_names: Sequence[str] | None, settings: TaskSettings) -> list[Path]:
        """predictions.csv (words, gold and predicted tags; wrong sentences first) and per_entity_type.csv/.md."""
        from finetune.reports import artifacts as A

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        continuation = continuation_tags(label_names)
        words = [" ".join(resplit([str(w) for w in row], [0] * len(row), settings.word_split, continuation)[0])
                 for row in reference.raw[reference.data.text_column]]
        frame = pd.DataFrame({"words": words[: len(outputs["gold"])],
                              "gold": [" ".join(t) for t in outputs["gold"]],
                              "predicted": [" ".join(t) for t in outputs["predicted"]]})
        frame["correct"] = frame["gold"] == frame["predicted"]
        kinds = sorted(k.removeprefix("f1_") for k in metrics if k.startswith("f1_"))
        table = pd.DataFrame([[k, metrics.get(f"precision_{k}", 0.0), metrics.get(f"recall_{k}", 0.0), metrics[f"f1_{k}"]]
                              for k in kinds] + [["all (micro)", metrics["precision"], metrics["recall"], metrics["f1"]]],
                             columns=["entity type", "precision", "recall", "f1"])
        return [A.write_predictions(out_dir / "predictions.csv", frame, ["correct"], [True]),
                *A.write_table(out_dir, "per_entity_type", table)]

    def parse_inputs(self, inputs: Sequence[Any], text_pair: bool) -> list[Any]:
        for i, item in enumerate(inputs):
            if not isinstance(item, str):
                raise InputError(i, "this model tags the words of a text: give a string")
            if not item.strip():
                raise InputError(i, "empty text")
        return list(inputs)

    def encode(self, tokenizer: Any, inputs: list[Any], text_pair: bool, max_length: int, settings: TaskSettings) -> Encoded:
        split = [split_words(text, settings.word_split) for text in inputs]
        rows = [[word for word, _ in words] for words in split]
        encoded = encode_words(tokenizer, rows, max_length + 1)
        truncated = [len(ids) > max_length for ids in encoded["input_ids"]]
        if any(truncated):
            encoded = encode_words(tokenizer, rows, max_length)
        features, meta = [], []
        for i in range(len(inputs)):
            features.append({k: encoded[k][i] for k in encoded})
            meta.append((encoded.word_ids(i), [span for _, span in split[i]]))
        return Encoded(features, list(range(len(inputs))), meta, truncated)

    def answer(self, inputs: list[Any], encoded: Encoded, rows: Sequence[np.ndarray], label_names: Sequence[str] | None,
               settings: TaskSettings, options: PostprocessOptions) -> list[dict[str, Any]]:
        assert label_names is not None
        answers = []
        for text, (word_ids, spans), logits, was_truncated in zip(inputs, encoded.meta, rows, encoded.truncated):
            probs = softmax(np.asarray(logits, dtype=np.float64))
            best = probs.argmax(axis=-1)
            tags = [label_names[i] for i in best]
            scores = probs[np.arange(len(best)), best]
            answers.append({"entities": merge_entities(text, word_ids, spans, tags, scores), "truncated": was_truncated})
        return answers

    def label_counts(self, split: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
        """Entities per type (B- tags; strict IOB2 starts every entity with one), and words in all."""
        assert label_names is not None
        labels = split["labels"]
        counts: dict[str, int] = {}
        words = 0
        for row in labels:
            for i in row:
                if i == IGNORE_INDEX:
                    continue
                words += 1
                name = label_names[i]
                if name.startswith("B-"):
                    counts[name[2:]] = counts.get(name[2:], 0) + 1
        return dict(sorted(counts.items())) | {"words": words}

    def example_input(self, text_pair: bool) -> Any:
        return "Angela Merkel met Emmanuel Macron in Paris."

    def format_answer(self, item: Any, answer: dict[str, Any]) -> str:
        shown = "; ".join(f"{e['type']}: {e['text']} ({e['score']:.2f})" for e in answer["entities"]) or "-"
        return f"{shown}\t{item}"


TOKEN_CLASSIFICATION = TokenClassificationTask()
