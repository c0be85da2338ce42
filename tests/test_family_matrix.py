"""The docs' support matrix (docs/guides/model-families.md) is generated from the tests' registry (tests/family_matrix.py): every cell is a case
the suite runs or a refusal `finetune validate` gives, with its reason."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from tests.family_matrix import (FAMILIES, FEATURES, MATRIX_END, MATRIX_PAGE, MATRIX_START, TASK_KINDS, families_for,
                                 markdown, refusal, write_matrix)


def test_the_docs_matrix_is_the_generated_one():
    page = MATRIX_PAGE.read_text(encoding="utf-8")
    assert MATRIX_START in page and MATRIX_END in page
    shown = page.split(MATRIX_START, 1)[1].split(MATRIX_END, 1)[0].strip()
    assert shown == markdown().strip(), f"{MATRIX_PAGE.name}'s family matrix is stale: run `python -m tests.family_matrix`"


def test_the_writer_replaces_only_what_is_between_the_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"before\n{MATRIX_START}\nold table\n{MATRIX_END}\nafter\n", encoding="utf-8")
    assert write_matrix(page) is True
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"before\n{MATRIX_START}\n") and text.endswith(f"{MATRIX_END}\nafter\n")
    assert "old table" not in text and markdown() in text
    assert write_matrix(page) is False


def test_the_matrix_covers_the_nine_families_and_refuses_only_what_transformers_lacks():
    from finetune.families import FAMILIES as REGISTERED

    assert FAMILIES == tuple(REGISTERED)
    refused = {(family, feature) for feature in FEATURES for family in FAMILIES if refusal(family, feature)}
    assert refused == {("eurobert", "question_answering"), ("eurobert", "multiple_choice")}
    assert "transformers has no question-answering head for eurobert" in refusal("eurobert", "question_answering")


def test_every_feature_names_a_test_that_takes_its_cases_from_the_registry():
    for feature, (_, test) in FEATURES.items():
        source = (ROOT / test).read_text(encoding="utf-8")
        if feature in TASK_KINDS or feature in ("serving", "calibration"):
            assert "for kind in TASK_KINDS for family in families_for(kind)" in source, test
        else:
            assert re.search(rf'families_for\("{feature}"\)', source), f"{test} does not run {feature} per family"
        assert families_for(feature), feature
