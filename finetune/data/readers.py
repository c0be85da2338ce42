"""Readers for the two data formats `datasets` has no builder for: CoNLL token files and SQuAD v1.1 JSON.

Each yields plain rows; `finetune.data.loading` turns them into a Dataset with `Dataset.from_generator`, whose
fingerprint (and so the tokenisation cache key) follows the files' paths, sizes and modification times.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


class FormatError(ValueError):
    """A file that does not follow the format the recipe names; the message gives the file and line."""


def read_conll(path: str | Path) -> Iterator[dict]:
    """Sentences of a CoNLL file: {"tokens": [...], "ner_tags": [...]}.

    One token per line with its tag in the last column (CoNLL-2003 has word, POS, chunk, NER), a blank
    line between sentences, `-DOCSTART-` lines skipped.
    """
    tokens: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                if tokens:
                    yield {"tokens": tokens, "ner_tags": tags}
                    tokens, tags = [], []
                continue
            parts = line.split()
            if parts[0] == "-DOCSTART-":
                continue
            if len(parts) < 2:
                raise FormatError(f"{path}:{number}: a CoNLL line needs a token and a tag separated by white space, got {line!r}")
            tokens.append(parts[0])
            tags.append(parts[-1])
    if tokens:
        yield {"tokens": tokens, "ner_tags": tags}


def read_squad(path: str | Path) -> Iterator[dict]:
    """Questions of a SQuAD v1.1 JSON file: {"id", "title", "context", "question", "answers": {"text", "answer_start"}}."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise FormatError(f"{path}: a SQuAD file is an object with a `data` list of articles")
    for article in document["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                answers = qa.get("answers", [])
                yield {
                    "id": str(qa.get("id", "")),
                    "title": article.get("title", ""),
                    "context": context,
                    "question": qa["question"],
                    "answers": {"text": [a["text"] for a in answers], "answer_start": [int(a["answer_start"]) for a in answers]},
                }


READERS = {"conll": read_conll, "squad": read_squad}


def rows_from_files(reader: str, paths: list[str], stamps: list[tuple[int, int]]) -> Iterator[dict]:
    """Every row of every file, for `Dataset.from_generator` (`stamps` are there only to key its cache)."""
    for path in paths:
        yield from READERS[reader](path)
