"""Where the PyTorch backend runs (`--device`) and at which precision, decided on any machine (CUDA mocked)."""

from __future__ import annotations

import pytest
import torch

from finetune.models.predictor import Predictor, inference_autocast, inference_device


def test_auto_is_the_gpu_when_there_is_one_and_cuda_is_refused_without(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device("auto").type == "cpu" and inference_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU.*--device cpu"):
        inference_device("cuda")
    with pytest.raises(ValueError, match="allowed values are auto, cpu, cuda"):
        inference_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device("auto").type == "cuda" and inference_device("cpu").type == "cpu"


def test_autocast_follows_the_precision_and_the_device_type():
    assert inference_autocast("fp32")._enabled is False
    bf16, fp16 = inference_autocast("bf16", "cuda"), inference_autocast("fp16", "cuda")
    assert (bf16.device, bf16.fast_dtype, fp16.fast_dtype) == ("cuda", torch.bfloat16, torch.float16)
    assert inference_autocast("bf16").device == "cpu"


def test_a_cpu_predictor_answers_as_before_and_fp16_needs_a_gpu(tiny_checkpoints, tmp_path, monkeypatch):
    from tests.conftest import tiny_recipe, train_outside_test

    recipe = tiny_recipe(tiny_checkpoints["bert"], output_dir=str(tmp_path / "run"), training={"max_steps": 2})
    predictor = Predictor.from_dir(train_outside_test(tmp_path, recipe).best_dir)
    before = predictor.logits(["a fine film", "a dull one"], None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert predictor.to_device("auto").device.type == "cpu" and predictor.runtime == "pytorch fp32"
    assert (predictor.logits(["a fine film", "a dull one"], None) == before).all()
    predictor.precision = "fp16"
    with pytest.raises(ValueError, match="fp16' needs a GPU"):
        predictor.to_device("cpu")
