"""bench/gpu_check.py's CPU self-check, and the device and precision decisions, CPU-runnable (issue 37)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from finetune.config.recipe import Recipe
from finetune.errors import RecipeError
from finetune.training import preflight, speed
from tests.conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_self_check_runs_every_section_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--self-check", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["self_check"] is True
    assert results["env"]["torch"] == torch.__version__
    for section in ("train", "accuracy", "serve"):
        assert "error" not in results[section], results[section]
    rows = results["train"]["rows"]
    assert {(r["impl"], r["shape"]) for r in rows} >= {("ours", "sst2"), ("ours", "packed"), ("trainer", "sst2"),
                                                       ("trainer", "packed")}
    assert all("error" not in r and r["samples_per_s"] > 0 and r["tflops"] > 0 for r in rows), rows
    assert all(r["mean_tokens"] == 32 for r in rows if r["shape"] == "packed")  # packed: exactly --seq tokens each
    assert results["train"]["ours_over_trainer"]
    assert results["accuracy"]["reached"] and results["accuracy"]["evals"]
    serve = results["serve"]["rows"]
    assert serve and all("error" not in r and r["c1"]["rps"] > 0 and r["c1"]["errors"] == 0 for r in serve), serve
    if not torch.cuda.is_available():
        assert any("CUDA" in s for s in results["skipped"] + results["train"]["skipped"])
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Training throughput", "## Time to accuracy", "## Serving"):
        assert heading in md


def _gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    return gpu_check


def test_peak_table_knows_the_h100_and_nothing_else_by_accident():
    gc = _gpu_check()
    assert gc.peak_bf16("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gc.peak_bf16("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert gc.peak_bf16("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert gc.peak_bf16("Some Unknown Card") is None
    assert gc.peak_bf16(None) is None


def test_the_carried_minilm_is_small_and_comes_back_close():
    """The MiniLM travels to a bare GPU machine in fp16 with int8 word embeddings (the carry limit is 64 MiB)."""
    from safetensors.torch import load_file

    from finetune.models import pretrained

    gc = _gpu_check()
    original = load_file(str(pretrained._packaged_path(gc.MINILM) / "model.safetensors"))
    packed = gc.pack_tensors(original)
    size = sum(t.numel() * t.element_size() for t in packed.values())
    assert size < 0.4 * sum(t.numel() * t.element_size() for t in original.values())
    restored = gc.unpack_tensors(packed)
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == torch.float32 and restored[name].shape == tensor.shape
        rows = tensor.float().abs().amax(dim=-1, keepdim=True) if tensor.dim() == 2 else tensor.float().abs().max()
        assert ((restored[name] - tensor.float()).abs() <= 0.005 * rows + 1e-3).all(), name


def test_packed_texts_are_at_least_the_sequence_length():
    from transformers import AutoTokenizer

    from finetune.models.pretrained import resolve_checkpoint

    gc = _gpu_check()
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(gc.MINILM).path)
    rows = gc.sst2_rows("train")[:200]
    packed = gc.packed_rows(rows, tokenizer, 64, 10)
    assert len(packed) == 10
    assert all(len(tokenizer(r["sentence"], truncation=True, max_length=64)["input_ids"]) == 64 for r in packed)


# ---------------------------------------------------------------------------------------------
# the device and precision decisions (training.mixed_precision: auto)
# ---------------------------------------------------------------------------------------------


def _cuda(bf16: bool):
    return mock.patch.multiple(torch.cuda, is_available=mock.Mock(return_value=True),
                               is_bf16_supported=mock.Mock(return_value=bf16))


def test_auto_is_bf16_on_a_gpu_that_has_it():
    with _cuda(bf16=True):
        assert preflight.choose_mixed_precision("auto") == "bf16"


def test_auto_is_fp16_on_a_gpu_without_bf16():
    with _cuda(bf16=False):
        assert preflight.choose_mixed_precision("auto") == "fp16"


def test_fp16_on_a_gpu_goes_through_accelerate_which_keeps_a_grad_scaler(tiny_checkpoints):
    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], training={"mixed_precision": "fp16"}))
    with _cuda(bf16=False):
        options = speed.accelerator_options(recipe)
        assert options["mixed_precision"] == "fp16"  # Accelerator(mixed_precision="fp16") makes the GradScaler
        assert options["dataloader_config"].non_blocking is True  # pinned batches copied asynchronously
        assert speed.describe_precision(recipe) == "fp16 mixed precision"
        assert not speed.trains_bf16_on_cpu(recipe)  # on a GPU, no CPU autocast on top of Accelerate's


def test_bf16_on_a_gpu_is_accelerates_mixed_precision(tiny_checkpoints):
    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], training={"mixed_precision": "auto"}))
    with _cuda(bf16=True):
        assert speed.accelerator_options(recipe)["mixed_precision"] == "bf16"
        assert speed.describe_precision(recipe) == "bf16 mixed precision"


def test_fp16_is_refused_without_a_gpu():
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        with pytest.raises(RecipeError, match="fp16 needs a CUDA GPU"):
            preflight.choose_mixed_precision("fp16")


@pytest.mark.parametrize("native, speedup, expected", [(False, 2.0, "no"), (True, 1.0, "no"), (True, 1.5, "bf16")])
def test_auto_on_a_cpu_is_fp32_unless_bf16_is_clearly_faster(native, speedup, expected):
    with mock.patch.object(torch.cuda, "is_available", return_value=False), \
         mock.patch.object(preflight, "cpu_computes_bf16", return_value=native), \
         mock.patch.object(preflight, "cpu_bf16_speedup", return_value=speedup):
        assert preflight.choose_mixed_precision("auto") == expected


def test_cpu_runs_never_ask_accelerate_for_mixed_precision(tiny_checkpoints):
    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"], training={"mixed_precision": "bf16"}))
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        options = speed.accelerator_options(recipe)
        assert options["mixed_precision"] == "no"  # bf16 on a CPU goes through training_autocast instead
        assert options["dataloader_config"].non_blocking is False
        assert speed.trains_bf16_on_cpu(recipe)


def test_the_run_header_names_the_gpu():
    with mock.patch.object(torch.cuda, "get_device_name", return_value="NVIDIA H100 80GB HBM3"):
        assert speed.describe_device(torch.device("cuda", 0)) == "cuda, NVIDIA H100 80GB HBM3"
    assert speed.describe_device(torch.device("cpu")).startswith("cpu, ")
