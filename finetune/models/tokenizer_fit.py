"""How well a checkpoint's vocabulary fits a recipe's text, measured on a sample and said before training.

A vocabulary made for one language cuts text of another into many small pieces (an English WordPiece vocabulary
cuts Hangul into jamo) or into `[UNK]`, and fine-tuning cannot undo that: the model sees fragments and unknowns.
`measure` tokenises a bounded sample of the train split's texts (the texts of a row as the task reads them, the
same way predict and serving get them: `Task.input_columns` and `Task.inputs_from_rows`) and compares the figures
with the same tokenizer on the shipped English sample (data/sst2). `finetune validate` and the run's header print
`TokenizerFit.line()` and, over the thresholds, `TokenizerFit.warning()`; the run logs `TokenizerFit.params()` to
MLflow so `finetune compare` shows them.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from finetune.tasks.base import nfc_all

MAX_TEXTS = 2000
"""Texts measured at most: the figures are stable to the shown digit long before (NSMC: 5.8 pieces per word from
200 reviews as from 2,000), and 2,000 short texts tokenise in about 0.2 s on two cores."""
MAX_CHARACTERS = 500_000
"""Characters measured at most, so 2,000 long documents (QA contexts, news) cost what short reviews do."""

UNK_WARN = 0.01
"""Warn when this share of the pieces is the unknown token. A vocabulary made for the text gives almost none
(MiniLM on the English sample: 0.00%); each `[UNK]` erases a whole word's meaning, and at 1% of the pieces about
one sentence in three loses a word (NSMC with MiniLM: 5.9%)."""
WORD_RATIO_WARN = 2.0
"""Warn when the text needs this many times the pieces per word the same tokenizer needs for English: a good fit
stays within about 1.5x (a multilingual vocabulary on German or Korean), a vocabulary of another script is 4-5x
(MiniLM on Korean: 5.8 against 1.2)."""
CHARACTER_WARN = 1.5
"""Text written without spaces is measured per character (see `NO_SPACE_SHARE`); warn at this many pieces per
character. A vocabulary that has the script's characters gives at most 1 (one piece per character, or fewer with
multi-character pieces); more means characters are cut into bytes or parts (byte-level BPE without the script:
2-3)."""
NO_SPACE_SHARE = 0.3
"""Measure per character when at least this share of the characters is in a script written without spaces
between words (Chinese, Japanese, Thai, Lao, Khmer, Myanmar): there a "word" between spaces is a phrase or a whole
sentence, so pieces per word says nothing about the vocabulary and would raise a false alarm. Korean is written
with spaces and is measured per word."""
ENGLISH_FALLBACK = 1.3
"""Pieces per word of English with an English vocabulary (MiniLM on the SST-2 sample: 1.21), the reference when
the shipped English sample is not there (finetune installed without its checkout)."""

ENGLISH_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sst2" / "train.tsv"
"""The English reference: the shipped SST-2 sample's sentences (lowercased, punctuation between spaces, which
lowers pieces per word a little against ordinary English; the same for every tokenizer)."""
ENGLISH_TEXTS = 1000
"""English sentences measured (about 19,000 words: pieces per word to within 0.01 of all 8,000)."""

DOCS = "docs/guides/languages.md"

# Hand-written ranges: Python's `re` has no script classes (the `regex` package would, for this one use).
_NO_SPACE_SCRIPTS = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\uff66-\uff9f\U00020000-\U0002fa1f]")
_WORD = re.compile(r"\S+")

_english_cache: dict[tuple, "Figures | None"] = {}


@dataclass(frozen=True)
class Figures:
    """What a tokenizer made of some texts: counts, and the ratios read from them."""

    texts: int
    words: int
    """Words between spaces."""
    characters: int
    """Characters other than spaces."""
    pieces: int
    unknown: int | None
    """Pieces that are the unknown token; None when the tokenizer cannot give one (byte-level BPE, byte fallback)."""
    single_character_words: int
    """Words of two or more characters cut into pieces of at most one character each (characters, bytes, jamo)."""
    per_character: bool
    """Measured per character: the text is mostly in scripts written without spaces (`NO_SPACE_SHARE`)."""

    @property
    def pieces_per_word(self) -> float:
        return self.pieces / self.words if self.words else 0.0

    @property
    def pieces_per_character(self) -> float:
        return self.pieces / self.characters if self.characters else 0.0

    @property
    def unk_share(self) -> float | None:
        return None if self.unknown is None else (self.unknown / self.pieces if self.pieces else 0.0)

    @property
    def single_character_share(self) -> float:
        return self.single_character_words / self.words if self.words else 0.0


@dataclass(frozen=True)
class TokenizerFit:
    """A recipe's texts and the English sample, as the checkpoint's tokenizer cuts them."""

    checkpoint: str
    data: Figures
    english: Figures | None
    """None when the shipped English sample is not there (`ENGLISH_FALLBACK` stands in)."""

    @property
    def english_pieces_per_word(self) -> float:
        return self.english.pieces_per_word if self.english is not None else ENGLISH_FALLBACK

    def problems(self) -> list[str]:
        """What is over the thresholds, one phrase each (empty: the vocabulary fits)."""
        d, found = self.data, []
        if d.per_character:
            if d.pieces_per_character >= CHARACTER_WARN:
                found.append(f"{d.pieces_per_character:.1f} pieces per character: characters are cut into bytes or parts")
        elif d.pieces_per_word >= WORD_RATIO_WARN * self.english_pieces_per_word:
            found.append(f"{d.pieces_per_word:.1f} pieces per word, {d.pieces_per_word / self.english_pieces_per_word:.1f}x "
                         f"its English {self.english_pieces_per_word:.1f}")
        if d.unk_share is not None and d.unk_share >= UNK_WARN:
            found.append(f"{d.unk_share:.1%} of the pieces are [UNK]")
        return found

    def line(self) -> str:
        """The one report line, e.g. `tokenizer fit: 5.8 pieces per word (English 1.2), 5.9% [UNK], ...`."""
        d = self.data
        if d.per_character:
            parts = [f"{d.pieces_per_character:.2f} pieces per character (text written without spaces)"]
        else:
            english = f"English {self.english_pieces_per_word:.1f}" + ("" if self.english is not None else ", typical")
            parts = [f"{d.pieces_per_word:.1f} pieces per word ({english})"]
        parts.append("no [UNK] (byte-level)" if d.unk_share is None else f"{d.unk_share:.1%} [UNK]")
        if not d.per_character:
            parts.append(f"{d.single_character_share:.0%} of words cut into single characters")
        return f"tokenizer fit: {', '.join(parts)}, in {d.texts:,} texts"

    def warning(self) -> str | None:
        """The warning over the thresholds, pointing to the fix (None: the vocabulary fits)."""
        found = self.problems()
        if not found:
            return None
        return (f"the vocabulary of {self.checkpoint} fits this text poorly ({'; '.join(found)}): the model reads "
                "fragments of words, and fine-tuning does not change its vocabulary. Adapt it: finetune convert --to "
                f"vocabulary {self.checkpoint} OUT --texts FILE, then finetune pretrain on your texts ({DOCS})")

    def params(self) -> dict[str, str]:
        """The figures as MLflow params (`tokenizer.*`), so `finetune compare` shows them beside the runs."""
        d = self.data
        return {
            "tokenizer.measure": "character" if d.per_character else "word",
            "tokenizer.pieces_per_word": f"{d.pieces_per_word:.3f}",
            "tokenizer.pieces_per_character": f"{d.pieces_per_character:.3f}",
            "tokenizer.unk_share": "none" if d.unk_share is None else f"{d.unk_share:.4f}",
            "tokenizer.single_character_words": f"{d.single_character_share:.4f}",
            "tokenizer.english_pieces_per_word": f"{self.english_pieces_per_word:.3f}",
            "tokenizer.fit_texts": str(d.texts),
            "tokenizer.fit": "poor" if self.problems() else "good",
        }


def measure(split: Any, recipe: Any, task: Any, tokenizer: Any) -> TokenizerFit | None:
    """The fit of `tokenizer` to a labelled split's texts (a seeded sample of `MAX_TEXTS` rows), with English beside
    it; None when the split has none of the text columns the task reads (validate reports those columns)."""
    data = recipe.data
    text_pair = data.text_pair_column is not None
    columns = task.input_columns(data, text_pair)
    if any(name is None or name not in split.column_names for name in columns.values()):
        return None
    sample = split if len(split) <= MAX_TEXTS else split.shuffle(seed=recipe.training.seed).select(range(MAX_TEXTS))
    rows = sample.select_columns(sorted(set(columns.values())))[:]
    # In NFC, as every path from text to prediction tokenises it (`finetune.tasks.base.nfc`).
    texts = nfc_all(_bounded(_strings(task.inputs_from_rows(rows, data, text_pair))))
    if not texts:
        return None
    return TokenizerFit(recipe.model.checkpoint, figures(tokenizer, texts), english_figures(tokenizer))


def english_figures(tokenizer: Any) -> Figures | None:
    """The tokenizer on the shipped English sample, measured once per tokenizer in a process (None: no sample)."""
    # The folder a tokenizer came from and its size name it within a process; `tokenizer_fingerprint` would be
    # exact but costs as much as measuring the English sample again.
    key = (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))
    if key not in _english_cache:
        texts = _english_texts()
        _english_cache[key] = figures(tokenizer, texts) if texts else None
    return _english_cache[key]


def figures(tokenizer: Any, texts: Sequence[str]) -> Figures:
    """Pieces, words, characters, `[UNK]`s and words cut into single characters of `texts` (no special tokens)."""
    fast = getattr(tokenizer, "is_fast", False)  # only `tokenizers`-backed tokenizers give offsets
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=fast,
                        return_attention_mask=False, return_token_type_ids=False)
    ids = encoded["input_ids"]
    offsets = encoded["offset_mapping"] if fast else [[] for _ in ids]  # no offsets: no words seen cut up
    pieces = sum(map(len, ids))
    # One string with every text, so words and pieces are found with one pass of numpy instead of a Python loop
    # over 200,000 pieces; "\n" between texts keeps words from joining across them.
    joined = "\n".join(texts)
    bases = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    spans = np.array([(m.start(), m.end()) for m in _WORD.finditer(joined)], dtype=np.int64).reshape(-1, 2)
    characters = int((spans[:, 1] - spans[:, 0]).sum())
    flat = np.array([pair for row in offsets for pair in row], dtype=np.int64).reshape(-1, 2)
    flat += np.repeat(bases, [len(row) for row in offsets])[:, None]
    words = len(spans)
    single = 0
    if words and len(flat):
        # A piece belongs to the word its last character is in: a byte-level piece may start at the space before
        # its word (`Ġword` without trimmed offsets). Pieces of no character (a lone `▁`) belong to no word.
        last = flat[:, 1] - 1
        owner = np.searchsorted(spans[:, 0], last, side="right") - 1
        inside = (flat[:, 1] > flat[:, 0]) & (owner >= 0) & (last < spans[np.clip(owner, 0, None), 1])
        owner, width = owner[inside], flat[inside, 1] - flat[inside, 0]
        counts = np.bincount(owner, minlength=words)
        wide = np.zeros(words, dtype=bool)
        wide[owner[width > 1]] = True  # a piece of two or more characters
        single = int(((spans[:, 1] - spans[:, 0] >= 2) & (counts >= 2) & ~wide).sum())
    unk_id = tokenizer.unk_token_id if _can_be_unknown(tokenizer) else None
    unknown = None if unk_id is None else sum(row.count(unk_id) for row in ids)
    no_space = len(_NO_SPACE_SCRIPTS.findall(joined))
    return Figures(texts=len(texts), words=words, characters=characters, pieces=pieces, unknown=unknown,
                   single_character_words=single, per_character=characters > 0 and no_space >= NO_SPACE_SHARE * characters)


def _can_be_unknown(tokenizer: Any) -> bool:
    """Whether the tokenizer can give its unknown token: not byte-level BPE (every byte is a piece) nor a model with
    byte fallback, though such tokenizers often name an unknown token (RoBERTa's `<unk>`)."""
    if tokenizer.unk_token_id is None:
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return True
    if getattr(backend.model, "byte_fallback", False):
        return False
    pre = backend.pre_tokenizer
    state = json.loads(pre.__getstate__()) if pre is not None else {}
    return "ByteLevel" not in json.dumps(state)


def _strings(inputs: Iterable[Any]) -> Iterable[str]:
    """Every text in the task's inputs: a text, a pair, a QA question and context, a multiple-choice context, start
    and choices (task inputs are texts, lists and dicts of them; `Task.inputs_from_rows`)."""
    for item in inputs:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            yield from _strings(item.values())
        elif isinstance(item, (list, tuple)):
            yield from _strings(item)


def _bounded(texts: Iterable[str]) -> list[str]:
    """Non-empty texts, each once (a QA context asked about five times), up to `MAX_TEXTS` and `MAX_CHARACTERS`."""
    kept: dict[str, None] = {}
    size = 0
    for text in texts:
        if not text.strip() or text in kept:
            continue
        kept[text] = None
        size += len(text)
        if len(kept) >= MAX_TEXTS or size >= MAX_CHARACTERS:
            break
    return list(kept)


def _english_texts() -> list[str]:
    if not ENGLISH_SAMPLE.is_file():
        return []
    texts = []
    with open(ENGLISH_SAMPLE, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader, None)  # the header
        for row in reader:
            if row and row[0].strip():
                texts.append(row[0])
            if len(texts) >= ENGLISH_TEXTS:
                break
    return texts
