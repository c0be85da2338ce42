"""The fiddly parts of NER, extractive QA and multiple choice, against hand-checked expectations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.tasks import metrics as M
from finetune.data.readers import read_conll, read_squad
from finetune.tasks.token_classification import align_labels, continuation_tags, merge_entities, tag_order
from finetune.tasks.question_answering import answer_positions, best_span, context_offsets, tokenize_windows
from finetune.tasks import IGNORE_INDEX as X
from finetune.tasks import InputError, get_task

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


# --- NER ---------------------------------------------------------------------------------------


def test_tag_order_puts_o_first_then_types_with_b_before_i():
    assert tag_order({"I-PER", "B-LOC", "O", "B-PER", "I-LOC"}) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_first_piece_carries_the_word_tag_the_rest_are_ignored():
    # "[CLS] wat ##ana ##be visited new york [SEP]": Watanabe is three pieces; New York two words.
    word_ids = [None, 0, 0, 0, 1, 2, 3, None]
    tags = [1, 0, 3, 4]  # B-PER O B-LOC I-LOC
    assert align_labels(word_ids, tags, False, continuation_tags(TAGS)) == [X, 1, X, X, 0, 3, 4, X]


def test_label_all_tokens_turns_b_into_i_on_continuation_pieces():
    word_ids = [None, 0, 0, 0, 1, 2, 2, None]
    tags = [1, 0, 3]  # B-PER O B-LOC
    assert continuation_tags(TAGS) == [0, 2, 2, 4, 4]
    assert align_labels(word_ids, tags, True, continuation_tags(TAGS)) == [X, 1, 2, 2, 0, 3, 4, X]


def test_alignment_with_a_real_tokenizer(tiny_checkpoints):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["bert"])
    words = ["Kenji", "Watanabe", "visited", "the", "film"]
    encoded = tokenizer([words], is_split_into_words=True)
    word_ids = encoded.word_ids(0)
    assert word_ids.count(1) > 1, "Watanabe should split into several pieces in the tiny vocabulary"
    labels = align_labels(word_ids, [1, 2, 0, 0, 0], False, continuation_tags(TAGS))
    # exactly one labelled piece per word, at the word's first piece
    firsts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert [i for i, label in enumerate(labels) if label != X] == firsts
    assert [labels[i] for i in firsts] == [1, 2, 0, 0, 0]


def test_entities_merge_pieces_into_words_and_words_into_spans():
    text = "Kenji Watanabe visited New York."
    # pieces: [CLS] ken ##ji wat ##anabe visited new york . [SEP]; words: Kenji Watanabe visited New York .
    word_ids = [None, 0, 0, 1, 1, 2, 3, 4, 5, None]
    spans = [(0, 5), (6, 14), (15, 22), (23, 26), (27, 31), (31, 32)]
    tags = ["O", "B-PER", "O", "I-PER", "B-LOC", "O", "B-LOC", "I-LOC", "O", "O"]  # non-first pieces are ignored
    scores = [0, 0.9, 0.1, 0.7, 0.2, 0.99, 0.8, 0.6, 0.95, 0]
    entities = merge_entities(text, word_ids, spans, tags, scores)
    assert entities == [
        {"type": "PER", "text": "Kenji Watanabe", "start": 0, "end": 14, "score": pytest.approx(0.8)},
        {"type": "LOC", "text": "New York", "start": 23, "end": 31, "score": pytest.approx(0.7)},
    ]


def test_entities_are_the_ones_the_metric_counts():
    """Strict IOB2, as seqeval scores them: an I- tag continuing nothing is no entity, a type change ends one."""
    text = "Paris Berlin Rome Oslo"
    spans = [(0, 5), (6, 12), (13, 17), (18, 22)]
    tags = ["O", "I-LOC", "B-PER", "I-LOC", "B-LOC", "O"]
    entities = merge_entities(text, [None, 0, 1, 2, 3, None], spans, tags, [0, 0.5, 0.5, 0.5, 0.5, 0])
    assert [(e["type"], e["text"]) for e in entities] == [("PER", "Berlin"), ("LOC", "Oslo")]
    gold = [["O", "B-PER", "O", "B-LOC"]]
    assert M.entity_scores(gold, [tags[1:-1]])["f1"] == 1.0  # the same two entities


def test_seqeval_strict_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC"], ["I-ORG", "O"]]  # strict IOB2: an I- start is no entity
    scores = M.entity_scores(gold, pred)
    assert scores["precision"] == pytest.approx(1.0)  # 2 predicted entities, both right
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(0.8)
    assert scores["f1_ORG"] == 0.0 and scores["f1_PER"] == 1.0
    assert scores["accuracy"] == pytest.approx(5 / 6)


def test_conll_reader_skips_docstart_and_splits_on_blank_lines(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n"
                    "Blackburn NNP I-NP I-PER\n")
    assert list(read_conll(path)) == [
        {"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", "O"]},
        {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]},
    ]


# --- QA ------------------------------------------------------------------------------------------


def test_squad_normalisation_and_scores_by_hand():
    assert M.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert M.normalize_answer("an apple, a pear") == "apple pear"
    assert M.squad_f1("the big red dog", "red dog") == pytest.approx(0.8)  # P 2/3, R 1
    scores = M.squad_scores(["Red Dog.", "a cat"], [["the red dog", "dog"], ["mouse"]])
    assert scores == {"exact_match": 50.0, "f1": 50.0}  # best over the gold answers, per question


def test_squad_reader_flattens_articles(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "abc def", "qas": [
        {"id": "1", "question": "q?", "answers": [{"text": "def", "answer_start": 4}]}]}]}]}))
    (row,) = read_squad(path)
    assert row == {"id": "1", "title": "T", "context": "abc def", "question": "q?",
                   "answers": {"text": ["def"], "answer_start": [4]}}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoints["bert"])


def _straddling_context(tokenizer, answer: str) -> tuple[str, int]:
    """A long context whose first window ends inside `answer` (so only a later window holds all of it)."""
    words = ("the film was good and " * 12).split()
    for k in range(len(words)):
        context = " ".join(words[:k] + answer.split() + words[k:])
        start = len(" ".join(words[:k])) + (1 if k else 0)
        encoded = tokenize_windows(tokenizer, ["where ?"], [context], max_length=32, doc_stride=8)
        first = [o for o in context_offsets(encoded, 0, context) if o is not None]
        if start < first[-1][1] < start + len(answer):
            return context, start
    raise AssertionError("no placement straddles the first window's end")


def test_long_context_is_split_into_overlapping_windows_and_the_answer_found_across_the_boundary(tokenizer):
    answer = "a gripping , beautiful film"
    context, start_char = _straddling_context(tokenizer, answer)
    encoded = tokenize_windows(tokenizer, ["where ?"], [context], max_length=32, doc_stride=8)
    windows = len(encoded["input_ids"])
    assert windows >= 3 and set(encoded["overflow_to_sample_mapping"]) == {0}
    offsets = [context_offsets(encoded, i, context) for i in range(windows)]
    spans = [[o for o in offs if o is not None] for offs in offsets]
    assert spans[0][-8:] == spans[1][:8]  # consecutive windows share doc_stride context tokens
    positions = [answer_positions(offs, start_char, start_char + len(answer)) for offs in offsets]
    assert positions[0] == (0, 0), "the first window cuts the answer, so it is taught [CLS]"
    inside = [i for i, p in enumerate(positions) if p != (0, 0)]
    assert inside == [1], positions
    s, e = positions[1]
    assert context[offsets[1][s][0]:offsets[1][e][1]] == answer
    # The first window prefers a span of the answer's first words; the second points at the whole answer
    # with higher logits. The best over windows is the whole answer, in the context's characters.
    rows = []
    for i, offs in enumerate(offsets):
        start, end = np.zeros(len(offs)), np.zeros(len(offs))
        if i == 0:
            first_piece = answer_positions(offs, start_char, start_char + 1)[0] or len(offs) - 3
            start[first_piece], end[len(offs) - 2] = 4.0, 4.0
        if i == 1:
            start[s], end[e] = 9.0, 9.0
        rows.append((start, end, offs))
    s_char, e_char, prob = best_span(rows, n_best_size=5, max_answer_length=30)
    assert context[s_char:e_char] == answer and 0 < prob <= 1


def test_best_span_respects_order_length_and_context_only():
    offsets = [None, None, (0, 3), (4, 9), (10, 15), None]  # [CLS] and the question are not context
    start = np.array([10.0, 0, 0, 5, 0, 0])  # [CLS] has the best start logit but is not context
    end = np.array([10.0, 0, 5, 0, 1, 0])    # the best context end (token 2) lies before the best start (3)
    s, e, prob = best_span([(start, end, offsets)], n_best_size=6, max_answer_length=30)
    assert (s, e) == (4, 15)  # start 3 + end 4 = 6 beats the one-token spans (5 each)
    s, e, _ = best_span([(start, end, offsets)], n_best_size=6, max_answer_length=1)
    assert (s, e) == (4, 9)  # one token only: start 3 + end 3 = 5, found before the tie at token 2
    assert best_span([(start, end, [None] * 6)], n_best_size=6, max_answer_length=30) is None


def test_qa_inputs_are_checked_with_the_field_named():
    task = get_task("question_answering")
    with pytest.raises(InputError, match="question"):
        task.parse_inputs(["just text"], False)
    with pytest.raises(InputError, match="unknown field"):
        task.parse_inputs([{"question": "q", "context": "c", "x": 1}], False)


def test_choice_inputs_are_checked():
    task = get_task("multiple_choice")
    with pytest.raises(InputError, match="choices"):
        task.parse_inputs([{"context": "c", "choices": ["only one"]}], False)
    assert task.parse_inputs([{"context": "c", "choices": ["a", "b"]}], False)
