"""Transfer-learning knobs on tiny random models: freezing, layer-wise learning rates, LoRA adapters (saved, reloaded,
exported, several served from one process), class weights and focal loss, temperature scaling, and starting from a
fine-tuned model."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.config.recipe import Recipe, TrainingSection
from finetune.errors import CheckpointError, RecipeError
from finetune.models import layers
from finetune.models.predictor import Predictor
from finetune.tasks import TaskSettings, get_task
from finetune.tasks.calibration import calibrate, fit_temperature, measure_held_out, nll, served_threshold
from finetune.training import train
from tests.conftest import DATA, TEST_DATA, tiny_recipe, train_outside_test, write_recipe

CLASSIFICATION, MULTI_LABEL = get_task("classification"), get_task("multi_label")


def _run(recipe: dict) -> train.RunResult:
    return train.main(Recipe.model_validate(recipe))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _eval_texts(n: int = 24) -> list[str]:
    lines = (DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:n + 1]
    return [line.split("\t")[0] for line in lines]


# --- class weights and focal loss -------------------------------------------------------------


def test_class_weights_and_focal_loss_equal_the_loss_computed_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-1.0, 1.0, 0.0], [0.3, 0.3, -2.0]])
    labels = torch.tensor([0, 2, 1, 1])
    weights = [1.0, 2.0, 0.5]
    p = _softmax(logits.numpy().astype(np.float64))
    gold = p[np.arange(4), labels.numpy()]
    w = np.asarray(weights)[labels.numpy()]

    def loss(**settings):
        return float(CLASSIFICATION.loss(SimpleNamespace(logits=logits), {"labels": labels}, TaskSettings(**settings)))

    assert loss() == pytest.approx(float(np.mean(-np.log(gold))), rel=1e-6)
    assert loss(class_weights=weights) == pytest.approx(float((w * -np.log(gold)).sum() / w.sum()), rel=1e-6)
    assert loss(class_weights=weights) != pytest.approx(loss(), rel=1e-3)
    focal = (w * (1 - gold) ** 2 * -np.log(gold)).sum() / w.sum()
    assert loss(class_weights=weights, loss="focal", focal_gamma=2.0) == pytest.approx(float(focal), rel=1e-6)
    assert loss(class_weights=weights, loss="focal", focal_gamma=0.0) == pytest.approx(loss(class_weights=weights), rel=1e-6)

    # Multi-label: pos_weight scales each label's positive term.
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    z = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]])
    pos_weight = np.asarray([3.0, 1.0, 0.5])
    s, y = 1 / (1 + np.exp(-z.numpy().astype(np.float64))), targets.numpy()
    per = -(pos_weight * y * np.log(s) + (1 - y) * np.log(1 - s))
    got = MULTI_LABEL.loss(SimpleNamespace(logits=z), {"labels": targets}, TaskSettings(class_weights=pos_weight.tolist()))
    assert float(got) == pytest.approx(float(per.mean()), rel=1e-6)
    p_t = y * s + (1 - y) * (1 - s)
    focal = MULTI_LABEL.loss(SimpleNamespace(logits=z), {"labels": targets},
                             TaskSettings(class_weights=pos_weight.tolist(), loss="focal", focal_gamma=1.5))
    assert float(focal) == pytest.approx(float(((1 - p_t) ** 1.5 * per).mean()), rel=1e-6)


def test_balanced_weights_come_from_train_counts_and_wrong_lengths_are_refused(tiny_checkpoints):
    import datasets

    train_split = datasets.Dataset.from_dict({"labels": [0, 0, 0, 1]})
    resolved = CLASSIFICATION.settings_for_training(TaskSettings(class_weights="balanced"), train_split, ["a", "b"])
    assert resolved.class_weights == pytest.approx([4 / (2 * 3), 4 / (2 * 1)], rel=1e-5)
    multi = datasets.Dataset.from_dict({"labels": [[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]})
    assert MULTI_LABEL.settings_for_training(TaskSettings(class_weights="balanced"), multi, ["x", "y"]).class_weights \
        == pytest.approx([1 / 3, 3.0], rel=1e-5)
    with pytest.raises(RecipeError, match=r"task.class_weights: 3 weights for 2 labels \(a, b\); give one per label"):
        CLASSIFICATION.settings_for_training(TaskSettings(class_weights=[1, 2, 3]), train_split, ["a", "b"])
    with pytest.raises(ValueError, match=r"task.class_weights: 3 weights for 2 labels \(negative, positive\)"):
        Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], task={"type": "classification", "class_weights": [1, 2, 3]}))
    with pytest.raises(ValueError, match="task.loss: focal is for classification and multi_label, not regression"):
        Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], "regression", task={"type": "regression", "loss": "focal"}))


def test_validate_warns_on_skewed_labels_and_names_the_knob(tiny_checkpoints, tmp_path, capsys):
    from finetune.cli.validate import validate

    rows = (DATA / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
    positives = [r for r in rows[1:] if r.endswith("\t1")][:60]
    negatives = [r for r in rows[1:] if r.endswith("\t0")][:6]
    (tmp_path / "skewed.tsv").write_text("\n".join([rows[0], *positives, *negatives]) + "\n", encoding="utf-8")
    recipe = tiny_recipe(tiny_checkpoints["bert"], data={"files": {"train": str(tmp_path / "skewed.tsv")},
                                                         "max_train_samples": None, "max_eval_samples": None})
    path = write_recipe(tmp_path / "skewed.yaml", recipe)
    assert validate(str(path), []) == 0
    out = capsys.readouterr().out
    assert "warning: the train labels are skewed" in out and "task.class_weights: balanced" in out
    assert validate(str(path), ["task.class_weights=balanced"]) == 0
    assert "labels are skewed" not in capsys.readouterr().out


# --- calibration ---------------------------------------------------------------------------


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    logits = rng.normal(0, 1, (400, 3))
    logits[np.arange(400), labels] += 1.0
    logits *= 6  # right often, but far too sure
    t = fit_temperature(logits, labels, multi_label=False)
    assert t > 2
    report = calibrate(logits, labels, multi_label=False)
    assert report.nll_after < report.nll_before and report.ece_after < report.ece_before
    assert report.nll_after == pytest.approx(nll(logits, labels, False, report.temperature))
    for other in (t * 0.8, t * 1.25):  # the fitted temperature is the minimum
        assert nll(logits, labels, False, other) > report.nll_after


def test_a_weighted_run_saves_its_weights_and_serves_calibrated_scores(tiny_checkpoints, tmp_path):
    import mlflow

    dev = (DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "test.tsv").write_text("\n".join([dev[0], *dev[100:300]]) + "\n", encoding="utf-8")
    recipe = tiny_recipe(tiny_checkpoints["bert"], task={"type": "classification", "class_weights": "balanced"},
                         tracking={"log_model": False, "system_metrics": False})
    recipe["data"]["files"]["test"] = str(tmp_path / "test.tsv")
    recipe["data"]["test_split"] = "test"
    result = _run(recipe)
    saved = json.loads((result.best_dir / "finetune.json").read_text())
    weights = saved["settings"]["class_weights"]
    assert isinstance(weights, list) and len(weights) == 2 and all(w > 0 for w in weights)
    temperature = saved["settings"]["temperature"]
    calibration = saved["calibration"]
    assert temperature == calibration["temperature"] > 0
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-12  # fitted on that split: never worse there
    predictor = Predictor.from_dir(result.best_dir)
    texts = _eval_texts()
    logits = predictor.logits(texts, None)
    scores = np.asarray([[a["scores"]["negative"], a["scores"]["positive"]] for a in predictor.predict(texts)])
    np.testing.assert_allclose(scores, _softmax(logits.astype(np.float64) / temperature), rtol=0, atol=1e-12)
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert "evaluation/reliability_diagram.png" in names
    run = client.get_run(result.run_id)
    assert run.data.metrics["calibration/temperature"] == pytest.approx(temperature)
    assert {"calibration/ece_before", "calibration/ece_after", "model/trainable_parameters"} <= set(run.data.metrics)
    card = (result.best_dir / "MODEL_CARD.md").read_text()
    assert "## Calibration" in card
    # Held out: the test split, which T was not fitted on, measured with the served model's own scores.
    test_texts = [line.split("\t")[0] for line in dev[100:300]]
    test_gold = np.asarray([int(line.split("\t")[1]) for line in dev[100:300]])
    expected = measure_held_out(calibrate(np.zeros((2, 2)), np.array([0, 1]), False, fixed=temperature),
                                predictor.logits(test_texts, None), test_gold, False)
    assert calibration["test_examples"] == 200
    # A score within float rounding of a bin edge may land in the next bin: each such score moves ECE by < 2/200.
    assert calibration["test_ece_before"] == pytest.approx(expected.test_ece_before, abs=0.01)
    assert calibration["test_ece_after"] == pytest.approx(expected.test_ece_after, abs=0.01)
    assert run.data.metrics["calibration/test_ece_after"] == pytest.approx(calibration["test_ece_after"])
    assert "On the 200 test examples, which T was not fitted on" in card


def test_the_moved_threshold_passes_the_same_labels_on_calibrated_scores():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (500, 7))
    for t in (0.1, 0.3, 0.5, 0.8):
        z = z[np.abs(z - np.log(t / (1 - t))).min(axis=1) > 1e-6]  # nothing on the cut itself, where rounding decides
        for temperature in (0.4, 1.0, 2.05, 7.0):
            moved = served_threshold(t, temperature)
            raw = 1 / (1 + np.exp(-z)) >= t
            assert np.array_equal(1 / (1 + np.exp(-z / temperature)) >= moved, raw), (t, temperature)
            if t != 0.5 and temperature != 1.0:
                assert (moved - t) * (0.5 - t) * (temperature - 1) > 0  # towards 0.5 when T > 1, away when T < 1
    assert served_threshold(0.5, 3.0) == 0.5


def test_a_calibrated_multi_label_model_serves_the_labels_evaluation_scored(tiny_checkpoints):
    """A threshold other than 0.5: the fitted temperature would move scores across it; the saved cut moves too."""
    result = _run(tiny_recipe(tiny_checkpoints["bert"], "multi_label", task={"type": "multi_label", "threshold": 0.3},
                              training={"max_steps": 6, "learning_rate": 5e-3},
                              tracking={"log_model": False, "system_metrics": False}))
    saved = json.loads((result.best_dir / "finetune.json").read_text())
    temperature, cut = saved["settings"]["temperature"], saved["settings"]["threshold"]
    assert temperature != pytest.approx(1.0, abs=1e-3)
    assert saved["calibration"]["threshold"] == 0.3 and saved["calibration"]["served_threshold"] == cut
    assert cut == pytest.approx(served_threshold(0.3, temperature), rel=1e-12) and cut != pytest.approx(0.3, abs=1e-3)
    predictor = Predictor.from_dir(result.best_dir)
    texts = [line.split("\t")[0] for line in (TEST_DATA / "goemotions_sample.tsv").read_text().splitlines()[1:41]]
    raw = 1 / (1 + np.exp(-predictor.logits(texts, None).astype(np.float64)))
    answers = predictor.predict(texts)
    names = list(answers[0]["scores"])
    for row, answer in zip(raw, answers):
        assert sorted(answer["labels"]) == sorted(n for n, p in zip(names, row) if p >= 0.3)
        assert all(answer["scores"][n] >= cut for n in answer["labels"])
    assert "threshold 0.3 on the uncalibrated scores" in (result.best_dir / "MODEL_CARD.md").read_text()


# --- freezing and learning rates -----------------------------------------------------------


def test_frozen_layers_do_not_change_and_have_no_optimizer_state(tiny_checkpoints):
    base = load_file(str(tiny_checkpoints["bert"] / "model.safetensors"))
    result = _run(tiny_recipe(tiny_checkpoints["bert"], training={"freeze": 1, "max_steps": 4, "learning_rate": 1e-2,
                                                                  "keep_checkpoints": True}))
    trained = load_file(str(result.best_dir / "model.safetensors"))
    frozen = [k for k in base if k.startswith("embeddings.") or k.startswith("encoder.layer.0.")]
    moving = [k for k in base if k.startswith("encoder.layer.1.")]
    assert frozen and moving
    for key in frozen:
        assert torch.equal(trained[f"bert.{key}"], base[key]), key
    assert any(not torch.equal(trained[f"bert.{k}"], base[k]) for k in moving)
    # The training-state checkpoint holds AdamW's two moments for the trainable parameters only.
    step = sorted((result.best_dir.parent / "checkpoints").glob("step-*"))[-1]
    moments = load_file(str(step / "optimizer.safetensors"))
    trainable = sum(1 for k in trained if not (k.startswith("bert.embeddings.") or k.startswith("bert.encoder.layer.0.")))
    assert len({k.split(".")[0] for k in moments}) == trainable


def test_a_frozen_encoder_is_cached_and_only_the_head_trains(tiny_checkpoints):
    from finetune.models.modeling import build_model
    from finetune.models.pretrained import resolve_checkpoint

    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"]))
    model, tokenizer = build_model(resolve_checkpoint(recipe.model.checkpoint), recipe.model, CLASSIFICATION,
                                   ["negative", "positive"])
    model.eval()
    batch = tokenizer(["a gripping film", "dull", "a gripping film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(**batch).logits
        cache = layers.FrozenFeatureCache(layers.base_module(model))
        first, again = model(**batch).logits, model(**batch).logits
    assert cache.computed == 2  # two distinct texts, each computed once
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(again, plain)

    base = load_file(str(tiny_checkpoints["bert"] / "model.safetensors"))
    result = _run(tiny_recipe(tiny_checkpoints["bert"], training={"freeze": "encoder", "max_steps": 4}))
    trained = load_file(str(result.best_dir / "model.safetensors"))
    assert all(torch.equal(trained[f"bert.{k}"], v) for k, v in base.items() if not k.startswith("pooler."))
    assert {k for k in trained if not k.startswith("bert.")} == {"classifier.weight", "classifier.bias"}
    # BERT's pooler is read only by the head and trains with it, on the cached first-token states.
    assert not torch.equal(trained["bert.pooler.dense.weight"], base["pooler.dense.weight"])


def test_layer_wise_learning_rates_are_as_specified(tiny_checkpoints):
    from transformers import AutoModelForSequenceClassification

    from finetune.training.optim import make_optimizer, make_scheduler, parameter_groups

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints["bert"], num_labels=2)
    cfg = TrainingSection(learning_rate=1e-3, layer_lr_decay=0.5, head_learning_rate=1e-2, warmup_steps=0)
    groups = parameter_groups(model, cfg)
    lr_of = {name: g["lr"] for g in groups for name, p in model.named_parameters() if any(p is q for q in g["params"])}
    expected = {"bert.embeddings.word_embeddings.weight": 1e-3 * 0.25, "bert.encoder.layer.0.output.dense.weight": 5e-4,
                "bert.encoder.layer.1.output.dense.weight": 1e-3, "bert.pooler.dense.weight": 1e-2,  # the pooler is the head's
                "classifier.weight": 1e-2, "classifier.bias": 1e-2}
    for name, lr in expected.items():
        assert lr_of[name] == pytest.approx(lr), name
    assert groups[0]["lr"] == 1e-3  # the logged train/learning_rate is the recipe's
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=10, num_processes=1)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    now = {g["lr"] / g["initial_lr"] for g in optimizer.param_groups}
    assert len({round(r, 12) for r in now}) == 1  # the schedule scales every group alike


def test_head_only_steps_keep_the_encoder_still_then_train_it(tiny_checkpoints):
    """training.head_only_steps: the encoder is bit for bit unchanged while the head trains alone, then it trains,
    warming up from 0 again; the head follows the recipe's schedule throughout."""
    from transformers import AutoModelForSequenceClassification

    from finetune.training.optim import make_optimizer, make_scheduler

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints["bert"], num_labels=2)
    cfg = TrainingSection(learning_rate=1e-2, head_only_steps=3, warmup_ratio=0.25)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=11, num_processes=1)
    head = [g for g in optimizer.param_groups if g["head"]]
    assert head and all(set(g["layers"]) == {"head"} for g in head)
    encoder_weight, head_weight = model.bert.encoder.layer[0].output.dense.weight, model.classifier.weight
    start_encoder, start_head = encoder_weight.detach().clone(), head_weight.detach().clone()
    batch = {"input_ids": torch.randint(5, 100, (4, 12)), "labels": torch.tensor([0, 1, 0, 1])}
    rates = []
    for step in range(11):
        rates.append((optimizer.param_groups[0]["lr"], head[0]["lr"]))
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step == 2:  # three optimizer steps of the head alone
            assert torch.equal(encoder_weight, start_encoder)
            assert not torch.equal(head_weight, start_head)
    assert not torch.equal(encoder_weight, start_encoder)
    encoder_rates = [e for e, _ in rates]
    assert encoder_rates[:4] == [0.0] * 4  # still, and the first step of its own warmup starts from 0
    assert 0 < encoder_rates[4] < encoder_rates[5]  # warming up over its share (2 of the 8 steps left)
    assert encoder_rates[6] == pytest.approx(rates[6][1])  # then the recipe's schedule, as the head has
    assert rates[1][1] > 0 and rates[0][1] == 0.0  # the head warms up from step 0


def test_a_head_first_run_logs_an_encoder_rate_of_0_then_trains_everything(tiny_checkpoints):
    import mlflow

    base = load_file(str(tiny_checkpoints["bert"] / "model.safetensors"))
    result = _run(tiny_recipe(tiny_checkpoints["bert"], training={"head_only_steps": 3, "max_steps": 6, "logging_steps": 1,
                                                                  "learning_rate": 1e-2, "warmup_ratio": 0}))
    rates = {m.step: m.value for m in mlflow.tracking.MlflowClient().get_metric_history(result.run_id, "train/learning_rate")}
    # Logged after step s: the rate of step s + 1. Steps 1-3 ran at 0, step 4 on (no warmup asked) at the schedule's.
    assert [rates[s] for s in (1, 2)] == [0.0, 0.0] and rates[3] == pytest.approx(1e-2 * 3 / 6)
    trained = load_file(str(result.best_dir / "model.safetensors"))
    assert not torch.equal(trained["bert.encoder.layer.0.output.dense.weight"], base["encoder.layer.0.output.dense.weight"])


def test_head_only_steps_that_leave_nothing_to_train_are_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="training.head_only_steps cannot be used with training.freeze: encoder"):
        Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], training={"freeze": "encoder", "head_only_steps": 2}))
    with pytest.raises(RecipeError, match=r"training.head_only_steps: 4, but the run has only 4 optimizer steps.*"
                                          r"allowed: 0 to 3"):
        _run(tiny_recipe(tiny_checkpoints["bert"], training={"head_only_steps": 4, "max_steps": 4}))


def test_impossible_freezing_is_refused_naming_the_limits(tiny_checkpoints):
    from finetune.training.preflight import preflight

    with pytest.raises(RecipeError, match=r"training.freeze: 5 layers, but the checkpoint has 2; allowed: 1 to 2"):
        preflight(Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], training={"freeze": 5})))
    with pytest.raises(ValueError, match="training.freeze: encoder cannot be used with model.adapter"):
        Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], training={"freeze": "encoder"},
                                          model={"checkpoint": str(tiny_checkpoints["bert"]), "adapter": {"r": 2}}))


# --- LoRA adapters ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_checkpoints, tmp_path_factory):
    """Two LoRA adapters on the same tiny base: sentiment (classification, logged to MLflow) and GoEmotions."""
    root = tmp_path_factory.mktemp("adapters")
    out = {"root": root}
    for name, kind in (("sentiment", "classification"), ("emotions", "multi_label")):
        result = train_outside_test(root, tiny_recipe(
            tiny_checkpoints["bert"], kind, output_dir=str(root / name),
            model={"checkpoint": str(tiny_checkpoints["bert"]), "max_length": 64, "adapter": {"r": 4}},
            training={"max_steps": 6, "batch_size": 16, "learning_rate": 5e-3, "logging_steps": 2},
            tracking={"log_model": name == "sentiment", "system_metrics": False, "experiment": "adapters"}))
        out[name] = result
    out["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    return out


def test_a_lora_model_is_small_reloads_the_same_and_exports_merged(adapters, tiny_checkpoints, tmp_path):
    from finetune.export.onnx import OnnxPredictor, export_onnx

    best = adapters["sentiment"].best_dir
    assert not (best / "model.safetensors").exists()
    adapter_bytes = (best / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.1 * (tiny_checkpoints["bert"] / "model.safetensors").stat().st_size
    info = json.loads((best / "finetune.json").read_text())["adapter"]
    assert info["r"] == 4 and info["target_modules"] == ["query", "value"] and info["head"] == ["classifier", "pooler"]
    texts = _eval_texts()
    first, second = Predictor.from_dir(best), Predictor.from_dir(best)
    logits = first.logits(texts, None)
    np.testing.assert_array_equal(logits, second.logits(texts, None))
    # The adapter and the head really trained: not the base with a fresh head.
    saved_with_head = str([n for n, p in first.model.named_parameters() if "modules_to_save" in n])
    assert "classifier" in saved_with_head and "pooler" in saved_with_head
    report = export_onnx(best, tmp_path / "onnx")
    assert report["onnx_fp32_agreement"] == 1.0
    assert (tmp_path / "onnx" / "model.safetensors").is_file() and not (tmp_path / "onnx" / "adapter_model.safetensors").exists()
    np.testing.assert_allclose(OnnxPredictor.from_dir(tmp_path / "onnx").logits(texts, None), logits, atol=1e-4)
    np.testing.assert_allclose(Predictor.from_dir(tmp_path / "onnx").logits(texts, None), logits, atol=1e-5)


def test_the_mlflow_model_of_an_adapter_answers_like_the_folder(adapters):
    import mlflow

    mlflow.set_tracking_uri(adapters["tracking_uri"])
    texts = _eval_texts(4)
    logged = mlflow.pyfunc.load_model(f"runs:/{adapters['sentiment'].run_id}/model").predict(texts)
    direct = Predictor.from_dir(adapters["sentiment"].best_dir).predict(texts)
    assert [a["label"] for a in logged] == [a["label"] for a in direct]
    assert [a["score"] for a in logged] == pytest.approx([a["score"] for a in direct], abs=1e-6)


def reseal(folder) -> None:
    """Record a model folder's files as they are now in its checksums, as if it had been saved that way."""
    from finetune.models.checksums import read_manifest, write_manifest

    write_manifest(folder, list(read_manifest(folder, "checksums.json")), "checksums.json")


def test_an_adapter_whose_base_is_missing_or_different_is_refused(adapters, tmp_path):
    from transformers import AutoModel

    copy = tmp_path / "copy"
    shutil.copytree(adapters["sentiment"].best_dir, copy)
    meta = json.loads((copy / "finetune.json").read_text())
    meta["adapter"]["base"]["checkpoint"] = str(tmp_path / "gone")
    (copy / "finetune.json").write_text(json.dumps(meta))
    reseal(copy)  # as if saved naming that base: the base check refuses, not the checksums
    with pytest.raises(CheckpointError, match=r"applies to the base checkpoint '.*gone', which cannot be loaded here"):
        Predictor.from_dir(copy)
    base = json.loads((adapters["sentiment"].best_dir / "finetune.json").read_text())["adapter"]["base"]["checkpoint"]
    changed = tmp_path / "changed"
    model = AutoModel.from_pretrained(base)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(0.01)
    model.save_pretrained(changed)
    meta["adapter"]["base"]["checkpoint"] = str(changed)
    (copy / "finetune.json").write_text(json.dumps(meta))
    reseal(copy)
    with pytest.raises(CheckpointError, match="is not the one this adapter was trained on"):
        Predictor.from_dir(copy)


def test_lora_target_modules_the_model_lacks_are_refused_listing_its_own(tiny_checkpoints):
    from finetune.models.starting import Start, build_for_run
    from finetune.models.pretrained import resolve_checkpoint

    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], model={
        "checkpoint": str(tiny_checkpoints["bert"]), "adapter": {"target_modules": ["q_proj"]}}))
    with pytest.raises(RecipeError, match=r"no linear layer named q_proj; its encoder's linear layers are: dense, key, query, value"):
        build_for_run(Start(resolve_checkpoint(recipe.model.checkpoint)), recipe.model, CLASSIFICATION, ["a", "b"])


@pytest.mark.e2e
def test_two_adapters_on_one_base_are_served_from_one_process(adapters):
    from serving.loading import load_models, parse_model_specs
    from tests.test_serving import Server

    a, b = adapters["sentiment"].best_dir, adapters["emotions"].best_dir
    texts = ["a gripping, beautiful film", "thanks, I love it", "dull and far too long"]
    want_a, want_b = Predictor.from_dir(a).predict(texts), Predictor.from_dir(b).predict(texts)
    # In one process the base's weights are held once.
    first, named = load_models(parse_model_specs([f"a={a}", f"b={b}"]))
    query = {n: dict(m.predictor.model.named_parameters()) for n, m in named.items()}
    key = next(k for k in query["a"] if k.endswith("layer.0.attention.self.query.base_layer.weight"))
    assert query["a"][key] is query["b"][key]
    assert first is named["a"]
    server = Server("--model", f"a={a}", "--model", f"b={b}")
    try:
        got_a = httpx.post(f"{server.url}/v1/models/a/predict", json={"inputs": texts}, timeout=30).json()["predictions"]
        got_b = httpx.post(f"{server.url}/v1/models/b/predict", json={"inputs": texts}, timeout=30).json()["predictions"]
        assert [g["label"] for g in got_a] == [w["label"] for w in want_a]
        assert [g["score"] for g in got_a] == pytest.approx([w["score"] for w in want_a], abs=1e-5)
        assert [g["labels"] for g in got_b] == [w["labels"] for w in want_b]
        for g, w in zip(got_b, want_b):
            assert list(g["scores"].values()) == pytest.approx(list(w["scores"].values()), abs=1e-5)
        default = server.post({"inputs": texts}).json()["predictions"]
        assert [d["label"] for d in default] == [w["label"] for w in want_a]
        listing = httpx.get(f"{server.url}/v1/models").json()
        assert listing["default"] == "a" and [m["name"] for m in listing["models"]] == ["a", "b"]
        assert [m["task"] for m in listing["models"]] == ["classification", "multi_label"]
        missing = httpx.post(f"{server.url}/v1/models/c/predict", json={"inputs": texts}, timeout=30)
        assert missing.status_code == 404 and "served here: a, b" in missing.text
        bad = httpx.post(f"{server.url}/v1/models/b/predict", json={"inputs": [3]}, timeout=30)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:3] == ["body", "inputs", 0]
    finally:
        server.stop()


# --- starting from a fine-tuned model --------------------------------------------------------


def test_a_parent_or_teacher_named_by_run_id_is_found_in_the_recipes_own_store(tiny_checkpoints, tmp_path,
                                                                               monkeypatch):
    """A recipe whose tracking.tracking_uri points elsewhere finds its parent (and its teacher) there, not in the
    store of the folder it runs from."""
    from finetune.errors import CheckpointError
    from finetune.training.preflight import preflight
    from finetune.training.teacher import load_teacher
    from finetune.tracking.tracker import tracking_uri

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    (tmp_path / "elsewhere").mkdir()
    tracked = {"log_model": True, "system_metrics": False, "tracking_uri": elsewhere}
    parent = _run(tiny_recipe(tiny_checkpoints["bert"], name="parent", tracking=tracked))
    # mlflow.set_tracking_uri also sets the variable; a new process starts with the working folder's store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    child = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], name="child", tracking=tracked,
                                              model={"checkpoint": parent.run_id}))
    _, start = preflight(child)
    assert start.parent_run_id == parent.run_id and start.parent.task == "classification"
    teacher, folder = load_teacher(parent.run_id, tracking_uri(child))
    assert teacher.info.task == "classification" and (folder / "MLmodel").is_file()

    here = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], name="child",
                                             model={"checkpoint": parent.run_id}))
    with pytest.raises(CheckpointError, match=f"model.checkpoint: model 'runs:/{parent.run_id}/model'"):
        preflight(here)  # the working folder's store has no such run


def test_starting_from_a_run_id_continues_from_that_models_weights(tiny_checkpoints, capsys):
    import mlflow

    from finetune.data.features import prepare
    from finetune.training.preflight import preflight
    from finetune.tracking.compare import compare_table

    parent = _run(tiny_recipe(tiny_checkpoints["bert"], tracking={"log_model": True, "system_metrics": False}))
    texts = _eval_texts()
    want = Predictor.from_dir(parent.best_dir).logits(texts, None)

    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], name="child", model={
        "checkpoint": parent.run_id, "max_length": 64}, training={"max_steps": 2}))
    task, start = preflight(recipe)
    assert start.parent_source == f"runs:/{parent.run_id}/model" and start.parent.task == "classification"
    from finetune.models.modeling import load_tokenizer

    data = prepare(recipe, task, load_tokenizer(start.resolved.path))
    model, built, _ = train.setup_model(recipe, task, start, data.label_names)
    assert built.head_reused is True
    step0 = Predictor(model, load_tokenizer(start.resolved.path), Predictor.from_dir(parent.best_dir).info)
    np.testing.assert_allclose(step0.logits(texts, None), want, rtol=0, atol=1e-6)

    child = train.main(recipe)
    run = mlflow.MlflowClient().get_run(child.run_id)
    assert run.data.tags["finetune.parent_model"] == f"runs:/{parent.run_id}/model"
    assert run.data.tags["finetune.parent_head"] == "reused"
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert {"training", "evaluation", "parent_model"} <= contexts
    assert json.loads((child.best_dir / "finetune.json").read_text())["parent"]["run_id"] == parent.run_id
    frame, _ = compare_table()
    assert set(frame["parent"]) == {"", f"runs:/{parent.run_id}/model"}

    # Another label set: the encoder is reused, the head replaced, and the run says so with both label sets.
    other = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], model={"checkpoint": str(parent.best_dir)},
                                              data={"label_names": ["positive", "negative"]}))
    task, start = preflight(other)
    model, built, _ = train.setup_model(other, task, start, ["positive", "negative"])
    assert built.head_reused is False
    assert "[negative, positive]) is replaced by a fresh one (classification, labels [positive, negative])" in built.notes[0]
    parent_weights = load_file(str(parent.best_dir / "model.safetensors"))
    mine = dict(model.named_parameters())
    assert torch.equal(mine["bert.encoder.layer.1.output.dense.weight"], parent_weights["bert.encoder.layer.1.output.dense.weight"])
    assert not torch.equal(mine["classifier.weight"], parent_weights["classifier.weight"])
