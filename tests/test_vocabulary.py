"""`finetune convert --to vocabulary`: pieces learned from the user's texts added to every family's tokenizer, their
embeddings started from the old pieces, and the result taken by `finetune pretrain` and `finetune run` as it is."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from finetune.errors import ConversionError
from finetune.models.vocabulary import adapt_vocabulary, initial_rows
from tests.conftest import train_outside_test, tiny_recipe
from tests.tiny_models import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
# Korean words (nouns, verb endings, particles) put together into review-like sentences: made here, so the test
# needs no data file and every word recurs often enough to be learned.
WORDS = ["영화", "정말", "재미있어요", "최악", "배우", "연기", "감동", "스토리", "지루했다", "너무", "좋았어요",
         "다시", "보고", "싶다", "시간", "아깝다", "음악", "최고", "별로", "추천합니다", "감독", "결말이", "아쉽다"]
ENGLISH = ["the movie was great", "a dull and lifeless film", "i loved every minute of it"]


def korean_texts(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(count)]


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("korean") / "reviews.txt"
    path.write_text("\n".join(korean_texts()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapted(tiny_checkpoints, texts_file, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every family's tiny checkpoint adapted to the Korean texts, once for the module."""
    out = tmp_path_factory.mktemp("adapted")
    return {family: (out / family, adapt_vocabulary(str(tiny_checkpoints[family]), out / family, [texts_file],
                                                    vocab_size=300))
            for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reads_the_texts_in_fewer_pieces_and_keeps_its_old_rows(family, adapted, tiny_checkpoints):
    target, report = adapted[family]
    assert report["pieces_added"] > 0
    before, after = report["before"], report["after"]
    # Fewer pieces, or (a tiny vocabulary without Hangul's jamo reads each word as one [UNK]) fewer [UNK]s.
    assert after["pieces_per_text"] < before["pieces_per_text"] or after["unk_share"] < before["unk_share"]
    assert after["unk_share"] < 0.05
    source = AutoModel.from_pretrained(tiny_checkpoints[family])
    model = AutoModel.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    old, new = source.get_input_embeddings().weight, model.get_input_embeddings().weight
    assert new.shape[0] == report["vocab_size_after"] >= report["first_new_id"] + report["pieces_added"]
    # What the checkpoint knew is untouched: its rows, and the English it read (whose pieces did not change).
    assert torch.equal(new[: old.shape[0]][: report["first_new_id"]], old[: report["first_new_id"]])
    source_tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints[family])
    for sentence in ENGLISH:
        if source_tokenizer(sentence)["input_ids"] == tokenizer(sentence)["input_ids"]:
            inputs = tokenizer(sentence, return_tensors="pt")
            with torch.inference_mode():
                assert torch.allclose(source(**inputs).last_hidden_state, model(**inputs).last_hidden_state, atol=1e-5)
    # The new pieces are in use on the texts, with ids from the new range.
    ids = tokenizer(korean_texts(20, seed=1), add_special_tokens=False)["input_ids"]
    assert any(i >= report["first_new_id"] for row in ids for i in row)


def test_a_new_row_is_the_mean_of_the_pieces_it_was_split_into(adapted, tiny_checkpoints):
    target, report = adapted["bert"]
    before = AutoTokenizer.from_pretrained(tiny_checkpoints["bert"])
    after = AutoTokenizer.from_pretrained(target)
    old = AutoModel.from_pretrained(tiny_checkpoints["bert"]).get_input_embeddings().weight
    new = AutoModel.from_pretrained(target).get_input_embeddings().weight
    piece = next(p for p in after.convert_ids_to_tokens(after("영화")["input_ids"]) if p not in before.get_vocab())
    parts = before(piece, add_special_tokens=False)["input_ids"]
    known = [i for i in parts if i != before.unk_token_id] or None
    want = old[known].mean(0) if known else old.mean(0)
    assert torch.allclose(new[after.convert_tokens_to_ids(piece)], want, atol=1e-6)


def test_bert_uncased_keeps_hangul_syllables_and_english_as_it_was(adapted, tiny_checkpoints):
    target, report = adapted["bert"]
    assert report["nfc_appended_to_normalizer"] is True  # BERT's accent stripping decomposes Hangul into jamo
    tokenizer = AutoTokenizer.from_pretrained(target)
    pieces = tokenizer.tokenize("영화 정말 재미있어요")
    assert "영화" in pieces and all(unicodedata.normalize("NFC", p) == p for p in pieces)
    before = AutoTokenizer.from_pretrained(tiny_checkpoints["bert"])
    # Accents are still stripped the way the checkpoint was trained: café reads as cafe.
    assert tokenizer.tokenize("Café déjà vu") == before.tokenize("Café déjà vu")
    # A decomposed (NFD) input reads as the composed one.
    assert tokenizer(unicodedata.normalize("NFD", "영화 최고"))["input_ids"] == tokenizer("영화 최고")["input_ids"]


def test_initial_rows_leave_unk_out_and_fall_back_to_the_mean():
    weight = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    rows = initial_rows(weight, [[1, 2], [3, 0], [0], []], unk_id=0)
    assert torch.equal(rows[0], weight[1:3].mean(0))
    assert torch.equal(rows[1], weight[3])
    assert torch.equal(rows[2], weight.mean(0)) and torch.equal(rows[3], weight.mean(0))


@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "roberta"])
def test_run_and_pretrain_take_the_adapted_checkpoint_as_it_is(family, adapted, tmp_path):
    target, _ = adapted[family]
    rows = [{"text": t, "label": "positive" if "최고" in t or "감동" in t else "negative"}
            for t in korean_texts(48, seed=2)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    data_section = {"files": {"train": str(data)}, "text_column": "text", "label_column": "label",
                    "label_names": ["negative", "positive"], "validation_size": 0.25}
    recipe = {**tiny_recipe(target), "data": data_section, "output_dir": str(tmp_path / "out")}
    recipe["training"] = {**recipe["training"], "max_steps": 2, "batch_size": 8}
    result = train_outside_test(tmp_path / "run", recipe)
    assert (result.best_dir / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(result.best_dir).tokenize("영화") == AutoTokenizer.from_pretrained(target).tokenize("영화")
    if family == "bert":
        texts = tmp_path / "texts.txt"
        texts.write_text("\n".join(korean_texts(64, seed=3)), encoding="utf-8")
        mlm = {**recipe, "name": "tiny-mlm", "task": {"type": "masked_lm"}, "output_dir": str(tmp_path / "mlm"),
               "data": {"files": {"train": str(texts)}, "validation_size": 0.25}}
        pretrained = train_outside_test(tmp_path / "mlm-run", mlm)
        assert (pretrained.best_dir / "model.safetensors").is_file()


def _convert(capsys, *args: str) -> tuple[int, str, str]:
    """`finetune convert --to vocabulary *args` as the command line runs it (in this process: no torch import)."""
    from finetune.cli import main

    capsys.readouterr()
    code = main(["convert", "--to", "vocabulary", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_refuses_what_it_cannot_use_and_writes_nothing(tiny_checkpoints, texts_file, tmp_path, capsys):
    bert = str(tiny_checkpoints["bert"])
    code, _, err = _convert(capsys, bert, str(tmp_path / "a"))
    assert code != 0 and "--texts FILE" in err and not (tmp_path / "a").exists()
    cp949 = tmp_path / "cp949.txt"
    cp949.write_bytes("영화 정말 좋아요\n".encode("cp949"))
    code, _, err = _convert(capsys, bert, str(tmp_path / "b"), "--texts", str(cp949))
    assert code != 0 and "line 1 is not UTF-8" in err and not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep me")
    code, _, err = _convert(capsys, bert, str(tmp_path / "c"), "--texts", str(texts_file))
    assert code != 0 and "--overwrite" in err
    assert (tmp_path / "c" / "mine.txt").read_text() == "keep me"


def test_cli_says_what_it_did_in_one_line(tiny_checkpoints, texts_file, tmp_path, capsys):
    code, out, err = _convert(capsys, str(tiny_checkpoints["bert"]), str(tmp_path / "ko"), "--texts", str(texts_file),
                              "--vocab-size", "300")
    assert code == 0, err
    report = json.loads(out)
    assert any(word in " ".join(report["examples"]) for word in WORDS)
    assert "\\u" not in out  # Hangul as Hangul, not escapes, in the output and in the folder's report
    assert "\\u" not in (tmp_path / "ko" / "conversion.json").read_text(encoding="utf-8")
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"added {report['pieces_added']:,} pieces") and "finetune pretrain" in last
    assert "Loading weights" not in err and "Writing model" not in err


def test_texts_that_teach_nothing_are_refused(tiny_checkpoints, tmp_path):
    english = tmp_path / "english.txt"
    english.write_text("\n".join(["the the the"] * 50), encoding="utf-8")
    with pytest.raises(ConversionError, match="nothing"):
        adapt_vocabulary(str(tiny_checkpoints["bert"]), tmp_path / "x", [english], vocab_size=100)
    assert not (tmp_path / "x").exists()
