"""Readers for the two data formats `datasets` has no builder for: CoNLL token files and SQuAD v1.1 JSON.

Each yields plain rows; `finetune.data.loading` turns them into a Dataset with `Dataset.from_generator`, whose
fingerprint (and so the tokenisation cache key) follows the files' paths, sizes and modification times.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator

SCAN_BLOCK = 1 << 20
"""Bytes decoded at a time when looking for the first byte a file's encoding cannot read."""
SUGGESTED = ("utf-8", "cp949")
"""Encodings tried on a file that does not decode, to say which one it is in: UTF-8, and CP949 (what Korean Excel
saves, a superset of EUC-KR). Others (Shift-JIS, GB18030, latin-1) decode almost any bytes, so they prove nothing."""


class FormatError(ValueError):
    """A file that does not follow the format the recipe names; the message gives the file and line."""


def is_utf8(encoding: str) -> bool:
    """Whether a codec name means UTF-8 (utf-8, UTF8, utf_8, ...), without or with a byte-order mark."""
    return codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")


def reading_encoding(encoding: str) -> str:
    """The codec files are opened with: UTF-8 is read as utf-8-sig, so a byte-order mark (Excel's "CSV UTF-8"
    writes one) is skipped instead of ending up in the first column's name."""
    return "utf-8-sig" if is_utf8(encoding) else encoding


def first_undecodable(path: str | Path, encoding: str) -> tuple[int, int, bytes] | None:
    """Where `path` stops decoding with `encoding`: (line number, byte offset, the bytes refused), or None when
    the whole file decodes. Streams the file a block at a time (never whole)."""
    decoder = codecs.getincrementaldecoder(reading_encoding(encoding))("strict")
    offset, lines = 0, 1
    with open(path, "rb") as f:
        while True:
            block = f.read(SCAN_BLOCK)
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                data = pending + block
                start = offset - len(pending) + e.start
                line = lines + data[:e.start].count(b"\n")
                return line, start, data[e.start:max(e.end, e.start + 2)]
            if not block:
                return None
            offset += len(block)
            lines += block.count(b"\n")


def decoding_problem(path: str | Path, encoding: str, option: str) -> str | None:
    """A message for a person when `path` does not decode with `encoding` (None when it does): the file, line and
    byte, the encoding tried, and the encoding it does decode with (UTF-8 or CP949) if one of those fits."""
    found = first_undecodable(path, encoding)
    if found is None:
        return None
    line, at, refused = found
    message = (f"{option}: {path} is not {encoding} text: line {line} (byte {at}) holds the bytes "
               f"{refused.hex(' ')}, which {encoding} cannot decode")
    fits = [name for name in SUGGESTED if codecs.lookup(name).name != codecs.lookup(encoding).name
            and first_undecodable(path, name) is None]
    if fits:
        what = "CP949 (Korean Excel's encoding, a superset of EUC-KR)" if fits[0] == "cp949" else "UTF-8"
        message += f"; the whole file decodes as {what}: set {option}: {fits[0]}"
    else:
        message += "; set it to the encoding the file was saved in (e.g. cp949, euc-kr, shift_jis, gb18030, latin-1)"
    return message


def read_conll(path: str | Path, encoding: str = "utf-8") -> Iterator[dict]:
    """Sentences of a CoNLL file: {"tokens": [...], "ner_tags": [...]}.

    One token per line with its tag in the last column (CoNLL-2003 has word, POS, chunk, NER), a blank
    line between sentences, `-DOCSTART-` lines skipped.
    """
    tokens: list[str] = []
    tags: list[str] = []
    with open(path, encoding=reading_encoding(encoding)) as f:
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


def read_squad(path: str | Path, encoding: str = "utf-8") -> Iterator[dict]:
    """Questions of a SQuAD v1.1 JSON file: {"id", "title", "context", "question", "answers": {"text", "answer_start"}}."""
    try:
        document = json.loads(Path(path).read_text(encoding=reading_encoding(encoding)))
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


def rows_from_files(reader: str, paths: list[str], stamps: list[tuple[int, int]],
                    encoding: str = "utf-8") -> Iterator[dict]:
    """Every row of every file, for `Dataset.from_generator` (`stamps` are there only to key its cache)."""
    for path in paths:
        yield from READERS[reader](path, encoding)
