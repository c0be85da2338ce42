"""What only CUDA has (issue 37): run on a GPU by bench/gpu_check.py (`-m gpu`); skipped without CUDA.

Mixed-precision training steps through finetune's real loop (bf16, and fp16 with Accelerate's GradScaler), resuming
a GPU run, GPU memory in the run's metrics, Accelerate placing the model and batches on cuda, the contrastive
method's pair phase in the run's precision, and serving on the GPU answering the labels the CPU answers.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_recipe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(recipe_dict: dict, **kwargs):
    from finetune.config.recipe import Recipe
    from finetune.training import train

    recipe = Recipe.model_validate(recipe_dict)
    return recipe, train.main(recipe, **kwargs)


def _gpu_recipe(checkpoint, tmp_path, precision: str, **training) -> dict:
    return tiny_recipe(checkpoint, output_dir=str(tmp_path / f"out-{precision}"),
                       training={"mixed_precision": precision, "max_steps": 6, **training})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_steps_on_the_gpu(tiny_checkpoints, tmp_path, precision):
    from accelerate import Accelerator

    from finetune.training import speed

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    seen = {}
    original = speed.new_accelerator

    def spy(recipe):
        accelerator = original(recipe)
        seen["accelerator"] = accelerator
        return accelerator

    speed.new_accelerator = spy
    try:
        recipe, result = _train(_gpu_recipe(tiny_checkpoints["bert"], tmp_path, precision))
    finally:
        speed.new_accelerator = original
    accelerator: Accelerator = seen["accelerator"]
    assert accelerator.device.type == "cuda"
    assert accelerator.mixed_precision == precision
    assert (accelerator.scaler is not None) == (precision == "fp16")  # fp16 steps go through the GradScaler
    assert result.steps == 6 and math.isfinite(result.best_metrics["loss"])


def test_a_gpu_run_resumes_where_it_stopped(tiny_checkpoints, tmp_path):
    from finetune.training import train

    recipe_dict = _gpu_recipe(tiny_checkpoints["bert"], tmp_path, "auto", max_steps=8, eval_strategy="steps",
                              eval_steps=4)

    class Stop(Exception):
        pass

    def stop_after_first_checkpoint(step, metrics):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        _train(recipe_dict, hooks=train.TrainingHooks(on_evaluate=stop_after_first_checkpoint))
    _, result = _train(recipe_dict, resume_run=True)
    assert result.resumed_from == 4
    assert result.steps == 8


def test_gpu_memory_is_in_the_runs_metrics(tiny_checkpoints, tmp_path):
    import mlflow

    _, result = _train(_gpu_recipe(tiny_checkpoints["bert"], tmp_path, "auto"))
    run = mlflow.get_run(result.run_id)
    gpu_memory = [k for k in run.data.metrics if "gpu" in k.lower() and "memory" in k.lower()]
    assert gpu_memory, sorted(run.data.metrics)
    assert all(run.data.metrics[k] > 0 for k in gpu_memory)
    params_and_tags = {**run.data.params, **run.data.tags}
    assert any("cuda" in str(v) for v in params_and_tags.values()), "the run does not record its device"


def test_accelerate_places_the_model_and_the_batches_on_cuda(tiny_checkpoints):
    from finetune.config.recipe import Recipe
    from finetune.training import speed

    recipe = Recipe.model_validate(tiny_recipe(tiny_checkpoints["bert"]))
    accelerator = speed.new_accelerator(recipe)
    try:
        model = torch.nn.Linear(4, 2)
        loader = torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4, pin_memory=True)
        model, loader = accelerator.prepare(model, loader)
        assert next(model.parameters()).device.type == "cuda"
        assert all(batch.device.type == "cuda" for batch in loader)
    finally:
        speed.release_accelerator()


def test_the_server_on_the_gpu_answers_the_labels_the_cpu_answers(tiny_checkpoints, tmp_path):
    import subprocess
    import sys

    from finetune.models.predictor import Predictor
    from tests.conftest import DATA

    help_text = subprocess.run([sys.executable, "-m", "serving", "--help"], capture_output=True, text=True).stdout
    if "--device" not in help_text:
        pytest.fail("serving has no --device option: the server cannot place its model or batches on the GPU")
    _, result = _train(_gpu_recipe(tiny_checkpoints["bert"], tmp_path, "auto"))
    texts = [line.split("\t")[0] for line in (DATA / "sst2" / "dev.tsv").read_text().splitlines()[1:65]]
    cpu = [p["label"] for p in Predictor.from_dir(result.best_dir).predict(texts)]
    gpu_predictor = Predictor.from_dir(result.best_dir, device="cuda")
    assert next(gpu_predictor.model.parameters()).device.type == "cuda"
    gpu = [p["label"] for p in gpu_predictor.predict(texts)]
    assert gpu == cpu


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_contrastive_pair_phase_on_the_gpu_follows_the_runs_precision(tiny_checkpoints, tmp_path, precision):
    """training.method contrastive end to end on cuda: the pair phase computes in bf16 autocast where the run trains
    in bf16, and in fp32 where it trains in fp16 (no loss scaler outside Accelerate's loop); the head then trains."""
    import mlflow

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    recipe = _gpu_recipe(tiny_checkpoints["bert"], tmp_path, precision, method="contrastive", freeze="encoder",
                         contrastive={"iterations": 2, "max_pairs": 32, "label_template": "About {}."})
    _, result = _train(recipe)
    note = mlflow.get_run(result.run_id).data.tags["finetune.training_method"]
    expected = "bf16 autocast" if precision == "bf16" else "fp32"
    assert note.startswith("method contrastive: 32 pairs, 2 steps, loss cosine, pooling ") and f", {expected}, " in note
    assert math.isfinite(result.best_metrics["loss"])
