"""How well a checkpoint's vocabulary fits the data (`finetune.models.tokenizer_fit`): the figures, the warning that
points to vocabulary adaptation, `finetune validate`'s and the run header's line, and the MLflow params."""

from __future__ import annotations

import os

import mlflow
import pytest

from finetune.cli import main
from finetune.config.recipe import Recipe
from finetune.data.loading import load_splits
from finetune.models import tokenizer_fit
from finetune.models.modeling import load_tokenizer
from finetune.models.pretrained import resolve_checkpoint
from finetune.tasks import get_task
from tests.conftest import DATA, ROOT, tiny_recipe, write_recipe

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
POINTER = "finetune convert --to vocabulary"
DOCS = "docs/guides/languages.md"

# Movie reviews written for this test, as NSMC's read: spaces between words (eojeol), particles attached.
KOREAN = [
    ("이 영화 정말 재미있어요", "positive"), ("배우들의 연기가 너무 어색해서 몰입이 안 됐다", "negative"),
    ("마지막 장면에서 눈물이 났습니다", "positive"), ("시간 낭비였다. 다시는 보고 싶지 않다", "negative"),
    ("음악과 영상미가 아름다운 작품", "positive"), ("스토리가 뻔하고 지루하다", "negative"),
    ("가족과 함께 보기 좋은 따뜻한 영화", "positive"), ("감독의 전작보다 훨씬 못하다", "negative"),
    ("주인공의 연기가 압권이었다 강력 추천", "positive"), ("돈 아깝다 최악의 영화", "negative"),
    ("웃기면서도 감동적인 이야기", "positive"), ("중간에 잠들었어요 너무 길어요", "negative"),
    ("올해 본 영화 중 최고였습니다", "positive"), ("억지 감동에 유치한 대사", "negative"),
    ("몇 번을 봐도 질리지 않는 명작", "positive"), ("광고에 속았다 내용이 하나도 없다", "negative"),
]
CHINESE = ["我喜欢这部电影，演员的表演非常出色。", "这部电影太无聊了，我看了一半就走了。", "故事很感人，音乐也很好听。",
           "导演拍得很用心，值得一看。", "剧情拖沓，浪费时间。", "特效很棒，但是故事一般。"]


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer(resolve_checkpoint(MINILM).path)


def _korean_tsv(folder) -> str:
    path = folder / "korean.tsv"
    path.write_text("document\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in KOREAN), encoding="utf-8")
    return str(path)


def _korean_recipe(folder, checkpoint: str, **sections) -> dict:
    recipe = {
        "name": "tiny-korean",
        "output_dir": str(folder / "runs" / "tiny-korean"),
        "model": {"checkpoint": checkpoint, "max_length": 32},
        "data": {"files": {"train": _korean_tsv(folder)}, "text_column": "document", "label_column": "label",
                 "label_names": ["negative", "positive"], "validation_size": 0.25},
        "task": {"type": "classification"},
        "training": {"max_steps": 2, "batch_size": 4, "logging_steps": 1},
        "tracking": {"log_model": False, "experiment": "tokenizer-fit"},
    }
    return recipe | sections


def _fit(recipe: dict, tokenizer=None) -> tokenizer_fit.TokenizerFit:
    """`measure` on the train split of a recipe, as validate and run call it."""
    r = Recipe.model_validate(recipe)
    task = get_task(r.task.type)
    _, train, _, _ = load_splits(r, task)
    tokenizer = tokenizer or load_tokenizer(resolve_checkpoint(r.model.checkpoint).path)
    return tokenizer_fit.measure(train, r, task, tokenizer)


def test_minilm_on_korean_warns_with_the_figures(minilm):
    fit = tokenizer_fit.TokenizerFit(MINILM, tokenizer_fit.figures(minilm, [t for t, _ in KOREAN]),
                                     tokenizer_fit.english_figures(minilm))
    d, english = fit.data, fit.english
    assert english is not None and 1.0 < english.pieces_per_word < 1.5 and english.unknown == 0
    assert not d.per_character  # Korean is written with spaces: measured per word
    assert d.pieces_per_word > 4 * english.pieces_per_word  # jamo: ~3 pieces per syllable
    assert d.unk_share >= 0.01
    assert d.single_character_share > 0.5
    assert fit.line().startswith(f"tokenizer fit: {d.pieces_per_word:.1f} pieces per word (English "
                                 f"{english.pieces_per_word:.1f}), {d.unk_share:.1%} [UNK]")
    warning = fit.warning()
    assert warning and f"{POINTER} {MINILM} OUT --texts FILE" in warning and "finetune pretrain" in warning
    assert DOCS in warning and "[UNK]" in warning and "pieces per word" in warning


def test_minilm_on_english_does_not_warn(minilm):
    sentences = [line.split("\t")[0] for line in (DATA / "sst2" / "dev.tsv").read_text().splitlines()[1:300]]
    fit = tokenizer_fit.TokenizerFit(MINILM, tokenizer_fit.figures(minilm, sentences), tokenizer_fit.english_figures(minilm))
    assert fit.data.pieces_per_word < 1.5 and fit.data.unk_share < 0.001
    assert fit.problems() == [] and fit.warning() is None
    assert fit.params()["tokenizer.fit"] == "good"


def test_the_warning_needs_a_figure_over_its_threshold():
    english = tokenizer_fit.Figures(texts=10, words=100, characters=500, pieces=120, unknown=0, single_character_words=0,
                                    per_character=False)

    def fit(pieces: int, unknown: int) -> tokenizer_fit.TokenizerFit:
        data = tokenizer_fit.Figures(texts=10, words=100, characters=400, pieces=pieces, unknown=unknown,
                                     single_character_words=0, per_character=False)
        return tokenizer_fit.TokenizerFit("c", data, english)

    assert fit(239, 2).warning() is None  # 2.39 pieces per word: just under 2x English (1.2); 0.8% [UNK]
    assert "2.4 pieces per word, 2.0x its English 1.2" in fit(240, 0).warning()
    assert "1.0% of the pieces are [UNK]" in fit(200, 2).warning() and "per word" not in fit(200, 2).warning()


def test_a_byte_level_bpe_has_no_unk_and_a_sane_report(tiny_checkpoints):
    tokenizer = load_tokenizer(tiny_checkpoints["roberta"])
    assert tokenizer.unk_token is not None  # RoBERTa names <unk>, but bytes never need it
    english = tokenizer_fit.english_figures(tokenizer)
    assert english.unknown is None and 1.0 < english.pieces_per_word < 3
    korean = tokenizer_fit.TokenizerFit("tiny-roberta", tokenizer_fit.figures(tokenizer, [t for t, _ in KOREAN]), english)
    assert korean.data.unk_share is None
    assert "no [UNK] (byte-level)" in korean.line()
    # Hangul syllables are three bytes each and the tiny vocabulary never saw them: several pieces per character.
    assert korean.data.pieces_per_character > 2 and korean.data.single_character_share > 0.9
    assert "[UNK]" not in korean.warning().split(":")[0] and "pieces per word" in korean.warning()
    assert korean.params()["tokenizer.unk_share"] == "none"


def _chinese_wordpiece():
    """A tiny uncased WordPiece tokenizer (BERT's normaliser and pre-tokenizer) whose vocabulary has the characters of
    CHINESE and of a few English words: text without spaces that it handles well."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = sorted({c for text in CHINESE for c in text} | set("abcdefghijklmnopqrstuvwxyz'.,"))
    vocab = specials + letters + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + ["the", "film", "a", "is"]
    backend = Tokenizer(models.WordPiece({p: i for i, p in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def test_chinese_without_spaces_is_measured_per_character_and_gives_no_false_alarm():
    tokenizer = _chinese_wordpiece()
    fit = tokenizer_fit.TokenizerFit("tiny-zh", tokenizer_fit.figures(tokenizer, CHINESE), tokenizer_fit.english_figures(tokenizer))
    d = fit.data
    assert d.per_character and d.unk_share == 0 and d.pieces_per_character == pytest.approx(1.0)
    # Per word (a whole sentence between spaces) it would have been a false alarm:
    assert d.pieces_per_word >= tokenizer_fit.WORD_RATIO_WARN * fit.english_pieces_per_word
    assert fit.warning() is None
    assert "pieces per character (text written without spaces)" in fit.line()
    assert fit.params()["tokenizer.measure"] == "character"


def test_chinese_cut_into_bytes_does_warn(tiny_checkpoints):
    tokenizer = load_tokenizer(tiny_checkpoints["roberta"])  # byte-level, never saw a Chinese character
    fit = tokenizer_fit.TokenizerFit("tiny-roberta", tokenizer_fit.figures(tokenizer, CHINESE), None)
    assert fit.data.per_character and fit.data.pieces_per_character >= tokenizer_fit.CHARACTER_WARN
    assert "pieces per character: characters are cut into bytes or parts" in fit.warning()


@pytest.mark.parametrize("kind", ["pair", "token_classification", "question_answering", "multiple_choice"])
def test_the_texts_of_a_row_are_the_task_s_inputs(tiny_checkpoints, kind, monkeypatch):
    seen: list[list[str]] = []
    figures = tokenizer_fit.figures
    monkeypatch.setattr(tokenizer_fit, "figures", lambda tokenizer, texts: seen.append(list(texts)) or figures(tokenizer, texts))
    recipe = tiny_recipe(tiny_checkpoints["bert"], kind)
    r = Recipe.model_validate(recipe)
    task = get_task(r.task.type)
    _, train, _, _ = load_splits(r, task)
    fit = tokenizer_fit.measure(train, r, task, load_tokenizer(tiny_checkpoints["bert"]))
    texts = set(seen[0])
    assert fit.data.texts == len(seen[0])
    data = r.data
    if kind == "pair":
        assert set(train[data.text_column]) <= texts and set(train[data.text_pair_column]) <= texts
    elif kind == "token_classification":  # pre-split words, joined as predict --input joins them
        assert " ".join(train[0][data.text_column]) in texts
    elif kind == "question_answering":  # the question and the context, each context once
        assert set(train[data.question_column]) <= texts and set(train[data.context_column]) <= texts
        assert len(texts) == len(set(train[data.question_column]) | set(train[data.context_column]))
    else:  # the context and every choice
        assert set(train[data.text_column]) <= texts and set(train[data.choice_columns[0]]) <= texts
    assert not any(str(label) in texts for label in ("0", "1", "B-PER"))  # never the labels


def test_validate_prints_the_line_and_the_pointer(tmp_path, capsys):
    path = write_recipe(tmp_path / "korean.yaml", _korean_recipe(tmp_path, MINILM))
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 0, text  # a warning, not a problem: the recipe can run as it is
    line = next(line for line in text.splitlines() if line.startswith("tokenizer fit: "))
    assert "pieces per word (English 1.2)" in line and "[UNK]" in line and "in 12 texts" in line  # the train split
    warning = next(line for line in text.splitlines() if line.startswith("warning: the vocabulary of"))
    assert f"{POINTER} {MINILM} OUT --texts FILE" in warning and DOCS in warning


def test_validate_on_english_prints_the_line_without_a_warning(tmp_path, capsys):
    recipe = tiny_recipe(MINILM, output_dir=str(tmp_path / "out"))
    code = main(["validate", str(write_recipe(tmp_path / "en.yaml", recipe))])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "tokenizer fit: 1.2 pieces per word (English 1.2), 0.0% [UNK]" in text
    assert "warning: the vocabulary" not in text


def test_the_run_header_says_it_and_mlflow_keeps_the_figures(tiny_checkpoints, tmp_path, capsys):
    # The tiny BERT's vocabulary is English words from the shipped samples: Korean is all [UNK] to it.
    path = write_recipe(tmp_path / "korean.yaml", _korean_recipe(tmp_path, str(tiny_checkpoints["bert"])))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr()
    assert "tokenizer fit: " in out.out
    assert "warning: the vocabulary of" in out.err and POINTER in out.err
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    run = mlflow.search_runs(experiment_names=["tokenizer-fit"], output_format="list")[0]
    params = run.data.params
    assert params["tokenizer.fit"] == "poor" and params["tokenizer.measure"] == "word"
    assert float(params["tokenizer.unk_share"]) > 0.5
    assert float(params["tokenizer.pieces_per_word"]) > 0 and float(params["tokenizer.english_pieces_per_word"]) > 0
    assert params["tokenizer.fit_texts"] == "12"


def test_the_shipped_korean_recipe_is_warned_about(tmp_path, capsys):
    path = ROOT / "recipes" / "korean.yaml"
    if not path.is_file():
        pytest.skip("recipes/korean.yaml is not shipped")
    files = [f"data.files.train={ROOT / 'data' / 'nsmc' / 'train.tsv'}",
             f"data.files.validation={ROOT / 'data' / 'nsmc' / 'test.tsv'}"]
    code = main(["validate", str(path), f"output_dir={tmp_path / 'out'}", *files])
    text = capsys.readouterr().out
    assert code == 0, text
    line = next(line for line in text.splitlines() if line.startswith("tokenizer fit: "))
    # NSMC with MiniLM: 5.8 pieces per word and 5.9% [UNK] on 2,000 training reviews; the 400 shipped ones are alike.
    words, unk = float(line.split(" pieces per word")[0].rsplit(" ", 1)[-1]), float(line.split("% [UNK]")[0].rsplit(" ", 1)[-1])
    assert 5.0 <= words <= 6.5 and 4.0 <= unk <= 8.0, line
    assert POINTER in text
