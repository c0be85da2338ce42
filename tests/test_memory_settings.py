"""The two memory knobs: `model.attention_dropout` (0 lets the fused attention kernel run) and
`training.gradient_checkpointing` (recompute activations in the backward pass)."""

from __future__ import annotations

import os
import platform
import types

import pytest
import torch

from finetune.config.recipe import ModelSection, Recipe, TrainingSection
from finetune.errors import RecipeError
from finetune.families.support import recipe_problems
from finetune.models import pretrained
from finetune.models.modeling import build_task_model
from finetune.tasks import get_task
from finetune.training import host_memory, speed
from tests.conftest import tiny_recipe


def _build(checkpoint, **model):
    recipe = Recipe.model_validate(tiny_recipe(checkpoint, model=model))
    resolved = pretrained.resolve_checkpoint(recipe.model.checkpoint)
    task = get_task("classification")
    built, _, _ = build_task_model(resolved, recipe.model, task, ["negative", "positive"])
    return built


def _batch(n: int = 4, length: int = 12):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding, as real batches have: the kernel must take a mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1][:n])}


@pytest.mark.parametrize("family,key", [("bert", "attention_probs_dropout_prob"), ("distilbert", "attention_dropout")])
def test_attention_dropout_reaches_the_attention_kernel_while_training(tiny_checkpoints, monkeypatch, family, key):
    assert getattr(_build(tiny_checkpoints[family]).config, key) == pytest.approx(0.1), "the checkpoint's by default"
    model = _build(tiny_checkpoints[family], attention_dropout=0.0)
    assert getattr(model.config, key) == 0.0
    seen = []
    plain = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0))
        return plain(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model.train()
    model(**_batch())
    assert seen and set(seen) == {0.0}, seen
    seen.clear()
    _build(tiny_checkpoints[family]).train()(**_batch())
    assert seen and all(p == pytest.approx(0.1) for p in seen), "without the field, the checkpoint's in training"


def test_attention_dropout_is_refused_out_of_range_or_where_a_model_has_none(tmp_path):
    from finetune.config.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {checkpoint: x}\ndata: {files: {train: t.csv}}\ntask: {type: classification}\n")
    for bad in ("1.0", "-0.1"):
        with pytest.raises(RecipeError, match="model.attention_dropout"):
            load_recipe(recipe, [f"model.attention_dropout={bad}"])
    no_setting = types.SimpleNamespace(model_type="mystery", max_position_embeddings=512)
    task = types.SimpleNamespace(name="classification", auto_model="AutoModelForSequenceClassification",
                                 pooled_head=True)
    recipe = types.SimpleNamespace(model=ModelSection(checkpoint="m", attention_dropout=0.0, trust_remote_code=True),
                                   training=TrainingSection())
    assert recipe_problems(no_setting, recipe, task) == [
        "model.attention_dropout: m (mystery) has no attention dropout setting in its config; remove the field"]
    recipe.model = ModelSection(checkpoint="m", trust_remote_code=True)
    assert recipe_problems(no_setting, recipe, task) == []


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients(tiny_checkpoints):
    def gradients(checkpointing: bool):
        torch.manual_seed(0)
        model = _build(tiny_checkpoints["bert"], attention_dropout=0.0)
        for module in model.modules():  # no dropout at all: the two runs must see the same arithmetic
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model = speed.prepare_model(model, TrainingSection(gradient_checkpointing=checkpointing))
        calls = []
        model.bert.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.append(1))
        model.train()
        model(**_batch()).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = gradients(False)
    checkpointed, checkpointed_calls = gradients(True)
    assert (plain_calls, checkpointed_calls) == (1, 2), "the layer's forward runs again during the backward pass"
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        scale = max(1.0, float(grad.abs().max()))
        assert torch.allclose(checkpointed[name], grad, rtol=0, atol=1e-5 * scale), name


def test_gradient_checkpointing_is_refused_for_a_model_without_it():
    with pytest.raises(RecipeError, match="training.gradient_checkpointing: Linear does not support it"):
        speed.prepare_model(torch.nn.Linear(2, 2), TrainingSection(gradient_checkpointing=True))


def test_a_tiny_run_trains_with_both_knobs(tiny_checkpoints):
    from finetune.training import train

    result = train.main(Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], model={"attention_dropout": 0.0},
        training={"max_steps": 3, "batch_size": 8, "gradient_checkpointing": True},
        tracking={"log_model": False, "system_metrics": False})))
    assert (result.best_dir / "model.safetensors").is_file()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_returns_freed_pages_that_free_alone_keeps():
    """What the training loop relies on: blocks freed in the middle of glibc's heap stay resident until trimmed."""
    trim = host_memory.malloc_trim()
    assert trim is not None
    trim(0)
    blocks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MiB in heap-sized blocks (below the mmap threshold)
    pin = bytearray(64 * 1024)  # the heap's top stays in use, so free() cannot shrink the heap from the top
    for b in blocks:
        b[::4096] = b"\x01" * len(b[::4096])  # touch every page
    before_free = _resident_bytes()
    del blocks
    after_free = _resident_bytes()
    trim(0)
    after_trim = _resident_bytes()
    assert after_free > before_free - 64 * 2**20, "free() alone already returned the pages: nothing to test"
    assert after_trim < after_free - 128 * 2**20, (before_free, after_free, after_trim)
    del pin


def test_freed_memory_is_returned_every_trim_every_steps_of_a_training_run(tiny_checkpoints, monkeypatch):
    from finetune.training import train

    calls = []
    monkeypatch.setattr(host_memory, "malloc_trim", lambda: calls.append)
    train.main(Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], training={"max_steps": 2 * host_memory.TRIM_EVERY + 3, "batch_size": 8},
        tracking={"log_model": False, "system_metrics": False})))
    assert calls == [0, 0]  # after steps 10 and 20 of 23


def test_without_glibc_nothing_is_trimmed(monkeypatch):
    monkeypatch.setattr(host_memory, "malloc_trim", lambda: None)
    freed = host_memory.FreedMemory()
    assert freed.trim is None
    freed.after_step(host_memory.TRIM_EVERY)  # no C library function: a no-op, no error
