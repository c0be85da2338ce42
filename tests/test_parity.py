"""The served model is the evaluated model: for every family and every task it has a head for, a tiny model is trained
until its predictions are not constant, then `finetune predict --input` (file scoring), the HTTP server and the
library's Predictor, given the evaluation split's raw texts, must give exactly the labels the training run's own
evaluation scored (its evaluation/predictions.csv, logged to MLflow), its scores within float tolerance, and the
metric computed from the served answers must be the logged one.

The cases come from tests/family_matrix.py (what the support matrix in docs/guides/model-families.md is generated from).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import finetune.tasks.metrics as M
from tests.conftest import DATA, tiny_recipe, train_outside_test
from tests.family_matrix import RECIPE_MODEL, TASK_KINDS, TASK_OF_KIND, families_for

pytestmark = pytest.mark.e2e

CASES = [(family, kind) for kind in TASK_KINDS for family in families_for(kind)]
EXAMPLES = 32
"""Trained on and evaluated on the same examples: a tiny model fits them, so its predictions differ by input."""
STEPS = {"pair": (32, 96), "multi_label": (32, 96)}
"""Training steps of the first attempt, and of the second when the first one's predictions were all the same
(default: 16, then 64; sentence pairs and multi-label take longer to fit)."""
SCORE_TOLERANCE = 1e-4  # scores of the same input alone and batched differ in float32 rounding only


WORDS_WITH_PUNCTUATION = [
    "The DT B-NP O\nU.S. NNP I-NP B-LOC\nbeat VBD B-VP O\nMexico NNP B-NP B-LOC\n2-1 CD I-NP O\nin IN B-PP O\n"
    "St. NNP B-NP B-LOC\nLouis NNP I-NP I-LOC\n. . O O",
    "J.R. NNP B-NP B-PER\nSmith NNP I-NP I-PER\n( ( O O\nA.C. NNP B-NP B-ORG\nMilan NNP I-NP I-ORG\n) ) O O\n"
    "scored VBD B-VP O\n. . O O",
]
"""CoNLL sentences whose words the `punctuation` word rule cuts: served texts are cut the same way."""


def fit_file(kind: str, source: Path, n: int, target: Path) -> Path:
    """The first n examples of a shipped sample, in its own format (SQuAD JSON, CoNLL, TSV with or without header)."""
    if source.suffix == ".json":
        data = json.loads(source.read_text())
        kept, count = [], 0
        for article in data["data"]:
            paragraphs = []
            for paragraph in article["paragraphs"]:
                qas = paragraph["qas"][: max(0, n - count)]
                count += len(qas)
                if qas:
                    paragraphs.append({**paragraph, "qas": qas})
            if paragraphs:
                kept.append({**article, "paragraphs": paragraphs})
        target.write_text(json.dumps({**data, "data": kept}))
    elif source.suffix == ".conll":
        blocks = [b for b in source.read_text().split("\n\n") if b.strip() and not b.startswith("-DOCSTART-")]
        # Words with punctuation inside ("2-1", "U.S.") first: serving must cut them as training did.
        blocks = WORDS_WITH_PUNCTUATION + sorted(blocks, key=lambda b: not re.search(r"\w[^\w\s]\w", b))
        target.write_text("\n\n".join(blocks[:n]) + "\n")
    else:
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        header = 0 if kind == "multiple_choice" else 1  # the CODAH sample names its columns in the recipe
        target.write_text("".join(lines[: header + n]), encoding="utf-8")
    return target


def film_labels(target: Path) -> Path:
    """The first SST-2 sentences as a multi-label set: their sentiment, and `film` when they say film or movie."""
    import csv
    import re

    with open(DATA / "sst2" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:EXAMPLES]
    lines = ["text\tlabels"]
    for row in rows:
        labels = ["negative", "positive"][int(row["label"])]
        if re.search(r"\b(film|movie)s?\b", row["sentence"]):
            labels += ",film"
        lines.append(f"{row['sentence']}\t{labels}")
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def parity_recipe(checkpoint: Path, family: str, kind: str, root: Path, steps: int) -> dict:
    """A recipe that trains `steps` steps on the first examples of the kind's sample and evaluates on them, once."""
    name = f"{family}-{kind}-{steps}"
    recipe = tiny_recipe(checkpoint, kind, output_dir=str(root / name),
                         model={"max_length": 128 if kind == "question_answering" else 64, **RECIPE_MODEL.get(family, {})},
                         training={"max_steps": steps, "learning_rate": 5e-3, "warmup_ratio": 0.0, "scheduler": "constant",
                                   "logging_steps": steps, "eval_strategy": "steps", "eval_steps": steps},
                         tracking={"log_model": False, "system_metrics": False, "experiment": "parity"})
    if kind == "question_answering":  # windows of 128 tokens overlapping by 32: the server reads at most 64 a context
        recipe["task"]["doc_stride"] = 32
    data = recipe["data"]
    source = Path(data["files"]["train"])
    fitted = fit_file(kind, source, EXAMPLES, root / f"{name}{source.suffix}")
    data["files"] = {"train": str(fitted), "validation": str(fitted)}
    for key in ("max_train_samples", "max_eval_samples", "validation_size"):
        data.pop(key, None)
    if kind == "multi_label":
        # GoEmotions' 28 rare labels are more than a tiny model fits in seconds (it predicts the commonest for every
        # text): SST-2 sentences labelled with their sentiment and whether they speak of a film or movie.
        labelled = str(film_labels(root / f"{name}.tsv"))
        data["files"] = {"train": labelled, "validation": labelled}
        data["label_names"] = ["negative", "positive", "film"]
    return recipe


@dataclass
class Trained:
    name: str
    recipe: Any
    result: Any
    reference: pd.DataFrame
    """The run's evaluation/predictions.csv, as MLflow logged it."""
    inputs: list[Any]
    rows: dict[str, list]
    """The evaluation split's raw columns."""


@pytest.fixture(scope="module")
def trained(tiny_checkpoints, tmp_path_factory) -> dict[tuple[str, str], Trained]:
    import mlflow

    from finetune.config.recipe import Recipe
    from finetune.data.loading import load_splits
    from finetune.tasks import get_task

    root = tmp_path_factory.mktemp("parity")
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    out = {}
    for family, kind in CASES:
        for steps in STEPS.get(kind, (16, 64)):  # until the predictions are not constant
            recipe_dict = parity_recipe(tiny_checkpoints[family], family, kind, root, steps)
            result = train_outside_test(root, recipe_dict)
            csv = client.download_artifacts(result.run_id, "evaluation/predictions.csv", str(root / f"{family}-{kind}-eval"))
            reference = pd.read_csv(csv, keep_default_na=False, dtype=str)
            if reference["predicted"].nunique() > 1:
                break
        recipe = Recipe.model_validate(recipe_dict)
        task = get_task(recipe.task.type)
        _, _, evaluation, _ = load_splits(recipe, task)
        columns = [c for c in task.input_columns(recipe.data, recipe.data.text_pair_column is not None).values() if c]
        raw = {c: list(evaluation[c]) for c in dict.fromkeys(columns + list(task.columns(recipe.data).values()))}
        inputs = task.inputs_from_rows(raw, recipe.data, recipe.data.text_pair_column is not None)
        out[(family, kind)] = Trained(f"{family}-{kind}", recipe, result, reference, inputs, raw)
    return out


@pytest.fixture(scope="module")
def server(trained):
    from tests.test_serving import Server

    models = [arg for case in trained.values() for arg in ("--model", f"{case.name}={case.result.best_dir}")]
    running = Server(*models, "--max-inputs", str(EXAMPLES))
    yield running
    running.stop()


def served(server, case: Trained) -> list[dict]:
    import httpx

    response = httpx.post(f"{server.url}/v1/models/{case.name}/predict", json={"inputs": case.inputs}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def scored(case: Trained, tmp_path: Path) -> list[dict]:
    """`finetune predict BEST --input eval.jsonl --output out.jsonl`: the answers of file scoring."""
    from finetune.cli import main

    source, target = tmp_path / f"{case.name}.jsonl", tmp_path / f"{case.name}-scored.jsonl"
    names = list(case.rows)
    with open(source, "w", encoding="utf-8") as f:
        for i in range(len(case.inputs)):
            f.write(json.dumps({n: case.rows[n][i] for n in names}) + "\n")
    assert main(["predict", str(case.result.best_dir), "--input", str(source), "--output", str(target)]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert all(not r.get("pred_error") for r in rows), rows
    return [{k.removeprefix("pred_"): v for k, v in r.items() if k.startswith("pred_") and k != "pred_error"}
            for r in rows]


# --- what the evaluation scored, per task, against the answers ---------------------------------------------------

def _lookup(reference: pd.DataFrame, keys: list[str]) -> dict[tuple, pd.Series]:
    return {tuple(str(row[k]) for k in keys): row for _, row in reference.iterrows()}


def check_sequence(case: Trained, answers: list[dict]) -> dict[str, float]:
    """Classification, pair, multi-label, regression: each answer against its predictions.csv row; the metrics."""
    from finetune.tasks import get_task

    data, kind = case.recipe.data, case.recipe.task.type
    task = get_task(kind)
    keys = ["text"] + (["text_pair"] if data.text_pair_column else [])
    rows = _lookup(case.reference, keys)
    texts = case.rows[data.text_column]
    pairs = case.rows[data.text_pair_column] if data.text_pair_column else [None] * len(texts)
    labels = case.rows[data.label_column]
    names = case.result_label_names
    predicted = []
    for text, pair, answer in zip(texts, pairs, answers):
        row = rows[(str(text),) + ((str(pair),) if pair is not None else ())]
        if kind == "classification":
            assert answer["label"] == row["predicted"]
            assert answer["score"] == pytest.approx(float(row["score"]), abs=SCORE_TOLERANCE)
            predicted.append(names.index(answer["label"]))
        elif kind == "multi_label":
            assert ";".join(answer["labels"]) == row["predicted"]
            mean = float(np.mean(answer["label_scores"])) if answer["labels"] else 0.0
            assert mean == pytest.approx(float(row["score"]), abs=SCORE_TOLERANCE)
            predicted.append([int(n in answer["labels"]) for n in names])
        else:
            assert answer["value"] == pytest.approx(float(row["predicted"]), abs=SCORE_TOLERANCE)
            predicted.append(answer["value"])
    if kind == "classification":
        gold = [names.index(str(v)) if str(v) in names else int(v) for v in labels]
        return M.compute_all(task.metrics, np.asarray(gold), np.asarray(predicted))
    if kind == "multi_label":
        gold_rows = case.reference_gold_matrix
        return M.compute_all(task.metrics, gold_rows, np.asarray(predicted))
    return M.compute_all(task.metrics, np.asarray(labels, dtype=float), np.asarray(predicted, dtype=float))


def check_entities(case: Trained, answers: list[dict]) -> dict[str, float]:
    """NER: the served entities are the ones the predicted tags of evaluation make (strict IOB2), at the characters
    of their words; the entity-level metrics of the served entities are the logged ones."""
    from seqeval.scheme import IOB2, Entities

    from finetune.tasks.token_classification import split_words

    rule = case.recipe.task.word_split
    rows = _lookup(case.reference, ["words"])
    gold, served_tags = [], []
    for text, answer in zip(case.inputs, answers):
        words = split_words(text, rule)
        row = rows[(" ".join(w for w, _ in words),)]
        tags = str(row["predicted"]).split()
        assert len(tags) == len(words)
        want = [(e.tag, words[e.start][1][0], words[e.end - 1][1][1]) for e in Entities([tags], IOB2, suffix=False).entities[0]]
        got = [(e["type"], e["start"], e["end"]) for e in answer["entities"]]
        assert got == want, (text, tags)
        assert all(e["text"] == text[e["start"]:e["end"]] and e["text"] == e["text"].strip() for e in answer["entities"])
        mine = ["O"] * len(words)
        for kind, start, end in got:
            inside = [i for i, (_, (s, e)) in enumerate(words) if s >= start and e <= end]
            mine[inside[0]] = f"B-{kind}"
            for i in inside[1:]:
                mine[i] = f"I-{kind}"
        served_tags.append(mine)
        gold.append(str(row["gold"]).split())
    scores = M.entity_scores(gold, served_tags)
    return {k: v for k, v in scores.items() if k in ("f1", "precision", "recall")}


def check_answers(case: Trained, answers: list[dict]) -> dict[str, float]:
    """QA: the served answer text is the one evaluation predicted; exact match and F1 of the served answers."""
    rows = _lookup(case.reference, ["question"])
    golds = []
    for item, answer in zip(case.inputs, answers):
        row = rows[(item["question"],)]
        assert answer["answer"] == row["predicted"]
        assert answer["answer"] == answer["answer"].strip(), "a span starts or ends at a character of the answer"
        if answer["answer"]:
            assert item["context"][answer["start"]:answer["end"]] == answer["answer"]
        golds.append([g for g in str(row["gold"]).split(" | ")])
    return M.squad_scores([a["answer"] for a in answers], golds)


def check_choices(case: Trained, answers: list[dict]) -> dict[str, float]:
    rows = _lookup(case.reference, ["context", "choices"])
    chosen = []
    for item, answer in zip(case.inputs, answers):
        row = rows[(item["context"], " | ".join(item["choices"]))]
        assert answer["choice"] == int(row["predicted"])
        assert answer["score"] == pytest.approx(float(row["score"]), abs=SCORE_TOLERANCE)
        chosen.append(answer["choice"])
    gold = [int(v) for v in case.rows[case.recipe.data.label_column]]
    return {"accuracy": float(np.mean(np.asarray(chosen) == np.asarray(gold)))}


CHECKS = {"classification": check_sequence, "multi_label": check_sequence, "regression": check_sequence,
          "token_classification": check_entities, "question_answering": check_answers, "multiple_choice": check_choices}


def not_constant(case: Trained, answers: list[dict]) -> bool:
    kind = case.recipe.task.type
    field = {"classification": "label", "regression": "value", "question_answering": "answer",
             "multiple_choice": "choice"}.get(kind)
    if field:
        return len({json.dumps(a[field]) for a in answers}) > 1
    if kind == "multi_label":
        return len({tuple(a["labels"]) for a in answers}) > 1
    return len({json.dumps(a["entities"]) for a in answers}) > 1


@pytest.mark.parametrize("family, kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_every_path_gives_the_answers_evaluation_scored(trained, server, family, kind, tmp_path):
    from finetune.models.predictor import Predictor

    case = trained[(family, kind)]
    case.result_label_names = json.loads((case.result.best_dir / "finetune.json").read_text())["label_names"]
    if kind == "multi_label":
        names = case.result_label_names
        case.reference_gold_matrix = np.asarray(
            [[int(n in str(row["gold"]).split(";")) for n in names] for _, row in
             case.reference.set_index("text").loc[[str(t) for t in case.rows[case.recipe.data.text_column]]]
             .reset_index().iterrows()])
    paths = {"server": served(server, case), "file scoring": scored(case, tmp_path),
             "Predictor": Predictor.from_dir(case.result.best_dir).predict(case.inputs)}
    assert not_constant(case, paths["Predictor"]), f"{case.name}: the trained model's predictions are constant"
    logged = case.result.best_metrics
    for path, answers in paths.items():
        assert len(answers) == len(case.inputs), path
        metrics = CHECKS[TASK_OF_KIND.get(kind, case.recipe.task.type)](case, answers)
        for name, value in metrics.items():
            assert value == pytest.approx(logged[name], abs=1e-6), f"{path}: {name} {value} != logged {logged[name]}"
    saved = json.loads((case.result.best_dir / "finetune.json").read_text())
    if kind in ("classification", "multi_label"):
        assert saved["settings"]["temperature"] is not None, "calibration ran and the served scores used it"
    # The folder every path loaded: safetensors only, and what it says of itself is what the run used.
    from finetune.training import speed

    assert (case.result.best_dir / "model.safetensors").is_file() and not list(case.result.best_dir.glob("*.bin"))
    assert saved["task"] == case.recipe.task.type and saved["text_pair"] is (kind == "pair")
    assert saved["pad_to_multiple_of"] == speed.pad_multiple(case.recipe), "predict and serve pad as training did"
    config = json.loads((case.result.best_dir / "config.json").read_text())
    if saved["label_names"] is not None:
        assert config["id2label"] == {str(i): n for i, n in enumerate(saved["label_names"])}
