"""`finetune convert --to vocabulary`: teach a checkpoint's tokenizer the pieces of a new language or domain.

An English checkpoint reads Korean as jamo and [UNK]s (about 46 pieces for a 37-character review). Adapting it is
what the vocabulary-transfer line of work does (e.g. Gee et al. 2022, "Fast Vocabulary Transfer"; WECHSEL):
  1. learn pieces from the user's texts with the checkpoint's own tokenizer pipeline (its normaliser,
     pre-tokeniser and model type: WordPiece, byte-level BPE or Unigram), by `tokenizers`' trainers through
     transformers' `train_new_from_iterator`;
  2. add the pieces the checkpoint lacks to its tokenizer, after its own (its segmentation of what it already
     knew stays as it was as far as the model type allows);
  3. give each new piece's embedding row (and the masked-LM head's output row and bias, where the checkpoint has
     them) the mean of the rows of the old pieces it used to be split into, so the model starts from what it read
     before instead of from noise;
then continued masked-LM pretraining (`finetune pretrain`) on the same texts teaches the new rows properly.

Written here because no well-kept library extends a trained tokenizer's model in place: `add_tokens` makes
"added tokens", matched as whole strings before the tokenizer's own segmentation (no word-piece continuation,
no merges, slow in the tens of thousands), and the `tokenizers` trainers only train from scratch.

One normaliser quirk is handled: BERT's uncased normaliser strips accents through NFD, which also decomposes
every Hangul syllable into its jamo, so no syllable piece could ever match. When the checkpoint's normaliser
leaves the user's texts decomposed in a way NFC would recompose, NFC is appended to it: English (and any text
whose accents the normaliser strips) is unchanged, Hangul stays syllables.
"""

from __future__ import annotations

import json
import shutil
import time
import unicodedata
from pathlib import Path
from typing import Any, Iterator

import torch

from finetune.errors import ConversionError
from finetune.models.conversion_folder import checked_source, publish, staging_folder

# Files of a sentence-transformers body (pooling and module list) carried over, so the adapted checkpoint is
# still one: the tokenizer and weights files are written anew.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                               "1_Pooling/config.json")
MAX_TEXT_CHARS = 10_000  # a longer line is cut for learning pieces: one runaway line must not dominate the counts
SAMPLE_FOR_FIGURES = 2_000  # texts the before/after figures are measured on


def read_texts(paths: list[str | Path]) -> list[str]:
    """The non-empty lines of UTF-8 text files (one text per line), each cut to MAX_TEXT_CHARS."""
    texts: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConversionError(f"--texts: {path} is not a file; give text files with one text per line")
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
                except UnicodeDecodeError as e:
                    raise ConversionError(f"--texts: {path} line {number} is not UTF-8 ({e.reason} at byte {e.start}); "
                                          "convert the file to UTF-8 first (e.g. iconv -f cp949 -t utf-8)") from None
                if line:
                    texts.append(line[:MAX_TEXT_CHARS])
    if not texts:
        raise ConversionError(f"--texts: no text in {', '.join(map(str, paths))}")
    return texts


def _is_byte_level(spec: dict[str, Any]) -> bool:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if "type" in node:
                yield node["type"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    return "ByteLevel" in set(walk(spec.get("pre_tokenizer")))


def needs_recomposition(normalizer: Any, texts: list[str]) -> bool:
    """Whether the normaliser leaves these texts decomposed in a way NFC would put back together (Hangul under
    BERT's accent stripping)."""
    if normalizer is None:
        return False
    for text in texts[:SAMPLE_FOR_FIGURES]:
        normalized = normalizer.normalize_str(text)
        if unicodedata.normalize("NFC", normalized) != normalized:
            return True
    return False


def _pipeline_with_nfc(spec: dict[str, Any]) -> dict[str, Any]:
    spec = json.loads(json.dumps(spec))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [spec["normalizer"], {"type": "NFC"}]}
    return spec


def _first_free_id(spec: dict[str, Any]) -> int:
    """Where new pieces start: after every id the tokenizer uses (spare embedding rows above them are reused)."""
    model = spec["model"]
    ids = list(model["vocab"].values()) if isinstance(model["vocab"], dict) else [len(model["vocab"]) - 1]
    ids += [t["id"] for t in spec.get("added_tokens") or []]
    return max(ids) + 1


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    # tokenizers writes merges as [a, b] pairs since 0.20 and as "a b" strings before.
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def extend_model(spec: dict[str, Any], learned: dict[str, Any], start: int) -> tuple[dict[str, Any], list[str]]:
    """The tokenizer JSON `spec` with the pieces of `learned` (the same model type, trained on the new texts)
    that it lacks, numbered from `start`; returns the new JSON and the added pieces in id order."""
    spec = json.loads(json.dumps(spec))
    model, new = spec["model"], learned["model"]
    kind = model["type"]
    if kind != new["type"]:
        raise ConversionError(f"the learned tokenizer is {new['type']}, the checkpoint's {kind}")
    added: list[str] = []
    if kind == "WordPiece":
        vocab = model["vocab"]
        for piece in sorted(new["vocab"], key=new["vocab"].get):
            if piece not in vocab:
                vocab[piece] = start + len(added)
                added.append(piece)
    elif kind == "BPE":
        vocab, merges = model["vocab"], _merge_pairs(model["merges"])
        known = set(merges)
        # The new merges go after the old ones (lowest priority), so what the old merges segmented stays as it
        # was; a new piece is added with the merge that makes it, only when both its halves exist by then.
        for a, b in _merge_pairs(new["merges"]):
            if (a, b) in known or a not in vocab or b not in vocab:
                continue
            merges.append((a, b))
            known.add((a, b))
            if a + b not in vocab:
                vocab[a + b] = start + len(added)
                added.append(a + b)
        as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
        model["merges"] = [f"{a} {b}" for a, b in merges] if as_strings else [list(m) for m in merges]
    elif kind == "Unigram":
        vocab = model["vocab"]  # [[piece, log probability], ...]: a piece's id is its index
        have = {piece for piece, _ in vocab}
        lowest = min(score for _, score in vocab)
        by_id = {t["id"]: t["content"] for t in spec.get("added_tokens") or []}
        while len(vocab) < start:  # ids the model does not list but added tokens or spare embedding rows hold
            vocab.append([by_id.get(len(vocab), f"<unused-{len(vocab)}>"), lowest - 10.0])
        for piece, score in new["vocab"]:
            if piece not in have:
                vocab.append([piece, score])
                have.add(piece)
                added.append(piece)
    else:
        raise ConversionError(f"the checkpoint's tokenizer is {kind}; --to vocabulary supports WordPiece, BPE and Unigram")
    return spec, added


def _old_pieces(backend: Any, spec: dict[str, Any], normalizer: Any, piece: str) -> list[int]:
    """The ids the source tokenizer split `piece`'s text into (its model on its normalised surface). `normalizer`
    is None for a byte-level tokenizer, whose pieces are already in the byte alphabet the model reads."""
    kind = spec["model"]["type"]
    surface, continuation = piece, False
    prefix = spec["model"].get("continuing_subword_prefix") or ""
    if kind == "WordPiece" and prefix and piece.startswith(prefix) and len(piece) > len(prefix):
        surface, continuation = piece[len(prefix):], True
    if normalizer is not None:
        surface = normalizer.normalize_str(surface) or surface
    tokens = backend.model.tokenize(surface)
    ids = [t.id for t in tokens]
    if continuation and tokens:
        first = backend.model.token_to_id(prefix + tokens[0].value)
        if first is not None:
            ids[0] = first
    return ids


def initial_rows(weight: torch.Tensor, sources: list[list[int]], unk_id: int | None) -> torch.Tensor:
    """One row per new piece: the mean of its old pieces' rows ([UNK] left out while others remain; a piece
    with nothing known gets the mean of all rows)."""
    fallback = weight.float().mean(0)
    rows = []
    for ids in sources:
        known = [i for i in ids if i != unk_id and 0 <= i < weight.shape[0]]
        rows.append(weight[known].float().mean(0) if known else fallback)
    return torch.stack(rows).to(weight.dtype) if rows else weight[:0]


def _figures(tokenizer: Any, texts: list[str]) -> dict[str, float]:
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pieces = sum(map(len, encoded))
    words = sum(len(t.split()) for t in texts) or 1
    unk = tokenizer.unk_token_id
    unks = sum(ids.count(unk) for ids in encoded) if unk is not None else 0
    return {"pieces_per_text": round(pieces / len(texts), 2), "pieces_per_word": round(pieces / words, 2),
            "unk_share": round(unks / max(pieces, 1), 4)}


def _english_sentences() -> list[str]:
    """The shipped SST-2 sample's sentences: what the checkpoint's English tokenisation is compared on."""
    import csv

    path = Path(__file__).resolve().parents[2] / "data" / "sst2" / "dev.tsv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:500]


def _load_weights_model(path: Path, config: Any, allow_pickle: bool) -> Any:
    """The checkpoint with its masked-LM head when it has one (its output rows and bias are extended too)."""
    from transformers import AutoModel, AutoModelForMaskedLM

    architectures = getattr(config, "architectures", None) or []
    cls = AutoModelForMaskedLM if any(a.endswith("ForMaskedLM") for a in architectures) else AutoModel
    return cls.from_pretrained(path, use_safetensors=None if allow_pickle else True)


def adapt_vocabulary(source: str, target: str | Path, texts: list[str | Path], vocab_size: int = 16000,
                     min_frequency: int = 2, allow_pickle: bool = False, overwrite: bool = False,
                     progress: Any = None) -> dict[str, Any]:
    """Write `source` with its vocabulary extended by pieces learned from `texts` to `target`; returns the report.

    `source` resolves like a recipe's model.checkpoint. `vocab_size` is the size of the vocabulary learned from
    the texts; its pieces the checkpoint lacks are added. The folder is written beside `target` and moved into
    place after it reloads and reads the texts with fewer pieces.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    say = progress or (lambda line: None)
    started = time.perf_counter()
    if vocab_size < 100:
        raise ConversionError(f"--vocab-size: {vocab_size} is too small; give the size of the vocabulary to learn "
                              "from the texts, e.g. 16000 (its pieces the checkpoint lacks are added)")
    target, resolved, config = checked_source(source, target, overwrite, allow_pickle)
    corpus = read_texts(texts)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ConversionError(f"{source} has no fast (tokenizers) tokenizer; --to vocabulary extends tokenizer.json")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    old_normalizer = tokenizer.backend_tokenizer.normalizer
    recompose = needs_recomposition(old_normalizer, corpus)
    pipeline = _pipeline_with_nfc(spec) if recompose else spec

    say(f"learning {vocab_size:,} pieces from {len(corpus):,} texts ({spec['model']['type']})")
    base = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(pipeline)))
    for name in ("unk_token", "pad_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token"):
        if getattr(tokenizer, name, None) is not None:
            setattr(base, name, getattr(tokenizer, name))
    learner = base.train_new_from_iterator(iter(corpus), vocab_size=vocab_size, min_frequency=min_frequency,
                                           length=len(corpus), show_progress=False)
    learned = json.loads(learner.backend_tokenizer.to_str())
    start = _first_free_id(spec)
    extended, added = extend_model(pipeline, learned, start)
    if not added:
        raise ConversionError(f"the texts taught no piece {source}'s vocabulary lacks; nothing to add")
    new_size = max(config.vocab_size, start + len(added))

    say(f"adding {len(added):,} pieces; new embedding rows from the old pieces they were split into")
    backend = Tokenizer.from_str(json.dumps(spec))
    unk_id = tokenizer.unk_token_id
    surface_normalizer = None if _is_byte_level(spec) else old_normalizer  # decided once, not per piece
    sources = [_old_pieces(backend, spec, surface_normalizer, piece) for piece in added]
    model = _load_weights_model(resolved.path, config, allow_pickle)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # From the rows as they were: resizing adds rows, which must not count in the fallback mean.
    rows = initial_rows(model.get_input_embeddings().weight.detach(), sources, unk_id)
    out_rows = None if output is None or tied else initial_rows(output.weight.detach(), sources, unk_id)
    old_bias = getattr(output, "bias", None)
    bias_rows = None if old_bias is None else torch.stack(
        [old_bias.detach()[[i for i in s if i != unk_id and i < old_bias.shape[0]] or list(range(old_bias.shape[0]))].mean()
         for s in sources])
    model.resize_token_embeddings(new_size, mean_resizing=False)
    new_ids = torch.arange(start, start + len(added))
    with torch.no_grad():
        model.get_input_embeddings().weight[new_ids] = rows
        output = model.get_output_embeddings() if output is not None else None
        if out_rows is not None:
            output.weight[new_ids] = out_rows
        bias = getattr(output, "bias", None) if output is not None else None
        if bias_rows is not None and bias is not None and bias.shape[0] == new_size:
            bias[new_ids] = bias_rows

    adapted = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(extended)))
    sample = corpus[:: max(1, len(corpus) // SAMPLE_FOR_FIGURES)][:SAMPLE_FOR_FIGURES]
    english = _english_sentences()
    with staging_folder(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tokenizer.json").write_text(json.dumps(extended, ensure_ascii=False), encoding="utf-8")
        # A family's tokenizer class rebuilds its normaliser from its own settings (transformers 5), which would
        # drop the appended NFC; the generic class reads tokenizer.json as it is, with the inputs the model takes.
        settings = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        settings.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=list(tokenizer.model_input_names))
        (tmp / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")
        for vocab_file in ("vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spm.model"):
            (tmp / vocab_file).unlink(missing_ok=True)  # the old pieces only: tokenizer.json is the vocabulary now
        for name in SENTENCE_TRANSFORMERS_FILES:
            if (resolved.path / name).is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(resolved.path / name, tmp / name)
        reloaded = AutoTokenizer.from_pretrained(tmp)
        probe = sample[:200]
        if reloaded(probe)["input_ids"] != adapted(probe)["input_ids"]:
            raise ConversionError("the saved tokenizer does not reload as it was built (tokenizer.json was not used)")
        before, after = _figures(tokenizer, sample), _figures(reloaded, sample)
        if not (after["pieces_per_text"] < before["pieces_per_text"] or after["unk_share"] < before["unk_share"]):
            raise ConversionError(f"the new pieces neither shorten the texts nor replace [UNK]s "
                                  f"({before['pieces_per_text']} pieces per text before, {after['pieces_per_text']} "
                                  f"after); nothing would be gained")
        unchanged = sum(a == b for a, b in zip(tokenizer(english)["input_ids"], reloaded(english)["input_ids"]))
        report = {
            "source": source, "source_path": str(resolved.path), "source_type": config.model_type,
            "target": str(target), "to": "vocabulary", "tokenizer_model": spec["model"]["type"],
            "texts": len(corpus), "learned_vocab_size": vocab_size, "pieces_added": len(added),
            "first_new_id": start, "vocab_size_before": config.vocab_size, "vocab_size_after": new_size,
            "nfc_appended_to_normalizer": recompose, "before": before, "after": after,
            "english_sentences_tokenized_as_before": f"{unchanged}/{len(english)}",
            "examples": {p: reloaded.convert_ids_to_tokens(reloaded(p, add_special_tokens=False)["input_ids"])
                         for p in sample[:2]},
        }
        return publish(tmp, target, report, started)
