"""ONNX export: parity with PyTorch, the int8 guard, BigBird refused, and serving the export."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from finetune.training import train
from finetune.cli import main as cli
from finetune.errors import ExportError
from finetune.export.onnx import OnnxPredictor, export_onnx
from finetune.models.predictor import Predictor
from finetune.config.recipe import Recipe
from tests.conftest import tiny_recipe

pytest.importorskip("onnxruntime")


@pytest.fixture
def trained(tiny_checkpoints):
    return lambda family="bert", kind="classification", **extra: train.main(
        Recipe.model_validate(tiny_recipe(tiny_checkpoints[family], kind, **extra))).best_dir


@pytest.mark.parametrize("family,kind", [("bert", "classification"), ("distilbert", "pair"), ("bert", "multi_label")])
def test_export_matches_pytorch(trained, tmp_path, family, kind):
    best = trained(family, kind)
    report = export_onnx(best, tmp_path / "onnx")
    assert report["onnx_fp32_agreement"] == 1.0
    assert report["onnx_fp32"] == pytest.approx(report["pytorch"])
    assert json.loads((tmp_path / "onnx" / "export_report.json").read_text()) == report
    texts = ["a gripping, beautiful film", "dull", "the plot is a mess but the acting is not bad at all"]
    pairs = texts[::-1] if kind == "pair" else None
    torch_logits = Predictor.from_dir(best).logits(texts, pairs)
    onnx_logits = OnnxPredictor.from_dir(tmp_path / "onnx").logits(texts, pairs)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)


def test_int8_export_is_checked_against_fp32_alone_and_batched(trained, tmp_path, monkeypatch):
    import finetune.export.onnx as export

    best = trained()
    report = export_onnx(best, tmp_path / "q", quantize="int8")
    assert (tmp_path / "q" / "model.int8.onnx").is_file()
    for key in ("onnx_int8", "onnx_int8_alone"):  # within the guard's one point of fp32, both ways of batching
        assert abs(report[key] - report["onnx_fp32"]) <= export.MAX_INT8_DROP
    assert 0.5 <= report["onnx_int8_alone_vs_batched_agreement"] <= 1.0 and 0.5 <= report["onnx_int8_agreement"] <= 1.0
    # A guard nothing can pass: refused with both figures, and the int8 file removed (the fp32 one kept).
    monkeypatch.setattr(export, "MAX_INT8_DROP", -1.0)
    with pytest.raises(ExportError, match=r"int8 quantization costs too much: accuracy .* in batches of 16 and .* one "
                                          r"input at a time, against .* in fp32"):
        export_onnx(best, tmp_path / "r", quantize="int8")
    assert not (tmp_path / "r" / "model.int8.onnx").exists() and (tmp_path / "r" / "model.onnx").is_file()


def test_block_sparse_bigbird_export_is_refused(tiny_checkpoints, tmp_path, capsys):
    recipe = tiny_recipe(tiny_checkpoints["big_bird"], model={"checkpoint": str(tiny_checkpoints["big_bird"]),
                                                              "max_length": 128, "attention_type": "block_sparse"},
                         training={"max_steps": 2})
    best = train.main(Recipe.model_validate(recipe)).best_dir
    assert cli(["export", str(best), str(tmp_path / "bb")]) == 2
    assert "BigBird with block_sparse attention cannot be exported to ONNX" in capsys.readouterr().err


@pytest.mark.e2e
def test_serving_the_onnx_export(trained, tmp_path):
    from tests.test_serving import Server

    best = trained()
    export_onnx(best, tmp_path / "onnx")
    expected = Predictor.from_dir(best).predict(["a gripping, beautiful film"])[0]
    server = Server("--model", str(tmp_path / "onnx"))
    try:
        (got,) = server.post({"inputs": ["a gripping, beautiful film"]}).json()["predictions"]
        assert got["label"] == expected["label"] and got["score"] == pytest.approx(expected["score"], abs=1e-4)
        assert httpx.get(f"{server.url}/v1/model").json()["runtime"] == "onnxruntime fp32"
    finally:
        server.stop()
    # The export folder keeps the safetensors weights, so asking for bf16 serves them with PyTorch instead.
    from serving.loading import load_model

    assert load_model(str(tmp_path / "onnx"), precision="bf16").predictor.runtime == "pytorch bf16"


@pytest.mark.e2e
def test_exporting_the_registry_champion(tiny_checkpoints, tmp_path, capsys):
    """`finetune export models:/NAME@champion` rebuilds the model folder from MLflow, with the run's recipe for the check."""
    from finetune.errors import ModelSourceError
    from serving.loading import load_model

    best = train.main(Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], tracking={"log_model": True, "register_as": "exported", "system_metrics": False}))).best_dir
    # ONNX Runtime serves exports only: asked of an MLflow model, it says how to make one instead of serving PyTorch.
    with pytest.raises(ModelSourceError, match=r"finetune export models:/exported@champion DST --quantize int8"):
        load_model(None, "exported", backend="onnx-int8")
    capsys.readouterr()
    assert cli(["export", "models:/exported@champion", str(tmp_path / "onnx")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 64 and report["onnx_fp32_agreement"] == 1.0
    texts = ["a gripping, beautiful film", "dull"]
    np.testing.assert_allclose(OnnxPredictor.from_dir(tmp_path / "onnx").logits(texts, None),
                               Predictor.from_dir(best).logits(texts, None), atol=1e-4)
    assert load_model(str(tmp_path / "onnx")).predictor.__class__ is OnnxPredictor


def test_export_without_a_recipe_needs_no_check(trained, tmp_path):
    best = trained()
    (best / "recipe.yaml").unlink()
    with pytest.raises(ExportError, match="no recipe.yaml, so the export cannot be checked.*--no-check"):
        export_onnx(best, tmp_path / "onnx")
    assert export_onnx(best, tmp_path / "onnx", check=False)["onnx"] == "model.onnx"
