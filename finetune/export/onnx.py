"""`finetune export --format onnx`: an ONNX Runtime copy of a trained model, checked against PyTorch.

The export folder is the trained model folder (safetensors, tokenizer, finetune.json) plus `model.onnx`
(and `model.int8.onnx` with dynamic int8 quantization, per-channel). At export, both backends predict the
recipe's evaluation split; their agreement and metric go into `export_report.json`, and an int8 model more than
one point below the fp32 one on the recipe's metric fails the export, with the figures.

The target folder is written as finetune.files writes folders: it must be new, empty, or an earlier export's
(its `.finetune-output.json` lists what finetune wrote there), or it is refused, naming it, before anything runs;
a link there is refused. The export is built in a private folder beside it and moved in file by file without
following links, replacing only files an earlier export wrote.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.errors import CheckpointError, ExportError
from finetune.files import RefusedWrite, check_output_folder, publish_files, staging_folder, write_atomic
from finetune.families import family_of
from finetune.models.checksums import read_manifest, write_manifest
from finetune.models.integrity import check_model_folder
from finetune.models.modeling import MANIFEST_FILE, ModelInfo
from finetune.models.predictor import Predictor

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MAX_INT8_DROP = 0.01  # of the recipe's metric (one point of accuracy)
SERVING_BATCH = 16  # finetune serve's default --max-batch-size: the int8 check measures batches of this size


class OnnxPredictor(Predictor):
    """A Predictor whose forward pass runs in ONNX Runtime; encoding and post-processing are the shared ones."""

    def __init__(self, onnx_path: Path, tokenizer: Any, info: ModelInfo, config: Any, batch_size: int = 32):
        self.onnx_path = onnx_path
        self.onnx_file = onnx_path.name
        self.sessions: dict[int, Any] = {}
        """One ONNX Runtime session per thread count the budget has asked for (see `use_threads`)."""
        # Predictor's own set-up, so the two backends never drift apart; the collator and the BigBird
        # guard read only the model's config.
        super().__init__(_ConfigOnly(config), tokenizer, info, batch_size=batch_size)
        self.use_threads(self.budget())  # loads the model now: a file it cannot read is refused before any input
        self.input_names = [i.name for i in self.session.get_inputs()]

    def use_threads(self, budget: Any) -> None:
        """Run the next batches in a session with the budget's thread count.

        ONNX Runtime fixes a session's pool when it is made and has no call to resize it, so each count the budget
        asks for gets its own session, made the first time (a second copy of the weights in memory, only once
        other processes have taken a core). A pool larger than the free cores makes every operator wait for the
        thread parked behind the neighbour, as torch's does (finetune.threads).
        """
        threads = budget.threads
        if threads not in self.sessions:
            self.sessions[threads] = self._new_session(threads)
        self.session = self.sessions[threads]

    def _new_session(self, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # ONNX Runtime's worker threads spin while idle by default; in a server they would take CPU from the
        # event loop that parses and answers requests between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = threads
        try:
            return ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types: named with the file, not a traceback
            raise CheckpointError(f"{self.onnx_path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                                  f"{str(e)[:200]}); make the export again with finetune export") from None

    @classmethod
    def from_dir(cls, path: Path | str, int8: bool = False, **kwargs: Any) -> "OnnxPredictor":
        from transformers import AutoConfig

        path = Path(path)
        onnx_path = path / (INT8_FILE if int8 else ONNX_FILE)
        if not onnx_path.is_file():
            raise ExportError(f"{path} has no {onnx_path.name}; make it with finetune export --format onnx")
        checked = check_model_folder(path)  # the ONNX files too, once the export has recorded their checksums
        return cls(onnx_path, checked.tokenizer, checked.info, AutoConfig.from_pretrained(path), **kwargs)

    @property
    def runtime(self) -> str:
        return f"onnxruntime {'int8' if self.onnx_file == INT8_FILE else 'fp32'}"

    def _forward(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        return self.session.run(None, {k: batch[k].numpy() for k in self.input_names})[0]


class _ConfigOnly(torch.nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.config = config


def export_onnx(model_dir: str | Path, target: str | Path, quantize: str | None = None, check: bool = True,
                source: str | None = None) -> dict[str, Any]:
    """Export, quantize if asked, check parity on the recipe's evaluation split; returns the report.

    `source` names where the model came from in the report (default: model_dir).
    """
    model_dir, target = Path(model_dir), Path(target)
    in_place = not target.is_symlink() and target.exists() and target.resolve() == model_dir.resolve()
    try:
        # Exporting into the model folder itself adds the ONNX files to a folder finetune made.
        check_output_folder(target, "DST (the export folder)", overwrite=in_place)
    except RefusedWrite as e:
        raise ExportError(str(e)) from None
    predictor = Predictor.from_dir(model_dir)
    config = predictor.model.config
    if not predictor.task.serves:
        raise ExportError(predictor.task.not_served(source or str(model_dir)))
    if not predictor.task.onnx_export:
        from finetune.tasks import TASKS

        covered = ", ".join(name for name, task in TASKS.items() if task.onnx_export)
        raise ExportError(
            f"ONNX export covers the sentence tasks ({covered}), not {predictor.task.name}: "
            "its outputs are per token or per choice and its parity check is not written yet. Serve it with the "
            "PyTorch backend."
        )
    refusal = family_of(config).export_problem(config)
    if refusal:
        raise ExportError(refusal)
    if check and not (model_dir / "recipe.yaml").is_file():
        raise ExportError(f"{model_dir} has no recipe.yaml, so the export cannot be checked on the recipe's "
                          "evaluation data; pass --no-check to export it unchecked")
    stage = staging_folder(target)
    try:
        shutil.copytree(model_dir, stage, dirs_exist_ok=True)
        try:
            report = _export(predictor, model_dir, stage, quantize, check, source)
        except ExportError:
            if (stage / ONNX_FILE).is_file():  # a failed int8 check: the checked fp32 export is kept
                _publish(stage, target, in_place)
            raise
        _publish(stage, target, in_place)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def _publish(staged: Path, target: Path, in_place: bool) -> None:
    """Move the staged export into DST (see the module docstring)."""
    try:
        publish_files(staged, target, "export", "DST (the export folder)", overwrite=in_place)
    except RefusedWrite as e:
        raise ExportError(str(e)) from None


def _export(predictor: Predictor, model_dir: Path, target: Path, quantize: str | None, check: bool,
            source: str | None) -> dict[str, Any]:
    """The export itself, in the staging folder `target` (a copy of the model folder)."""
    config = predictor.model.config
    if predictor.info.adapter:
        predictor = _merge_adapter(predictor, target)
    # Tracing passes inputs by position, so they go in the order of the model's forward() signature.
    order = list(inspect.signature(predictor.model.forward).parameters)
    names = sorted((n for n in predictor.tokenizer.model_input_names
                    if n in ("input_ids", "attention_mask", "token_type_ids") and n in order), key=order.index)
    if names != order[: len(names)]:
        raise ExportError(f"cannot export {config.model_type}: its forward() does not start with {names}")
    sample = predictor.tokenizer(["an example", "a second, longer example sentence"], padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    with torch.inference_mode():
        torch.onnx.export(predictor.model.eval(), tuple(sample[n] for n in names), str(target / ONNX_FILE),
                          input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Per-channel weight scales: one scale per output row keeps the rows with small weights from being
        # rounded to a few levels by the largest row. Measured on the quickstart model (872 SST-2 dev
        # sentences): per-tensor int8 loses 1.3 points of accuracy, per-channel none (0.8429 vs 0.8394 in
        # fp32), at the same speed. Excluding the classifier, the first or last layer, or the embeddings,
        # reduce_range and uint8 weights were no better (BENCHMARKS.md).
        quantize_dynamic(str(target / ONNX_FILE), str(target / INT8_FILE), weight_type=QuantType.QInt8,
                         per_channel=True)
    report: dict[str, Any] = {"source": source or str(model_dir), "onnx": ONNX_FILE, "int8": INT8_FILE if quantize else None}
    if check:
        report.update(_parity(model_dir, target, predictor, quantize == "int8"))
    _record_onnx_checksums(target)
    write_atomic(target / "export_report.json", json.dumps(report, indent=2))
    return report


def _record_onnx_checksums(target: Path) -> None:
    """Add the ONNX files to the copied model folder's checksums, so serving the export verifies them too
    (a folder saved before checksums existed stays unverified)."""
    listed = read_manifest(target, MANIFEST_FILE)
    if listed is None:
        return
    files = [rel for rel in listed if rel not in (ONNX_FILE, INT8_FILE)]
    files += [name for name in (ONNX_FILE, INT8_FILE) if (target / name).is_file()]
    write_manifest(target, files, MANIFEST_FILE)


def _merge_adapter(predictor: Predictor, target: Path) -> Predictor:
    """An adapter model folded into its base: the export folder becomes a plain full model (safetensors, config,
    finetune.json without the adapter) beside model.onnx, so it serves without the base checkpoint."""
    from dataclasses import replace

    from finetune.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merged
    from finetune.models.modeling import write_model_info

    model = merged(predictor.model)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (target / name).unlink(missing_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    info = replace(predictor.info, adapter=None)
    write_model_info(target, info)
    if read_manifest(target, MANIFEST_FILE) is not None:
        # The copied checksums name the adapter's files: list the merged weights instead (with config and
        # tokenizer and finetune.json, as a saved folder does; the recipe and the card are not listed).
        unlisted = {MANIFEST_FILE, "recipe.yaml", "MODEL_CARD.md", "export_report.json", ONNX_FILE,
                    INT8_FILE}
        write_manifest(target, sorted(p.relative_to(target).as_posix() for p in target.rglob("*")
                                      if p.is_file() and p.name not in unlisted), MANIFEST_FILE)
    return Predictor(model, predictor.tokenizer, info)


def _parity(model_dir: Path, target: Path, reference: Predictor, int8: bool) -> dict[str, Any]:
    from finetune.config.recipe import load_recipe
    from finetune.data.loading import load_splits

    recipe = load_recipe(model_dir / "recipe.yaml")
    task = reference.task
    _, _, evaluation, _ = load_splits(recipe, task)
    texts = evaluation[recipe.data.text_column]
    pairs = evaluation[recipe.data.text_pair_column] if recipe.data.text_pair_column else None
    gold = np.asarray(evaluation["labels"])
    metric = recipe.task.metric_for_best
    greater = task.greater_is_better(metric)
    features, _ = reference.encode(texts, pairs)
    results: dict[str, Any] = {"examples": len(texts), "metric": metric}
    torch_logits = reference.logits_from_features(features)
    results["pytorch"] = task.compute_metrics(torch_logits, gold, recipe.task.threshold)[metric]
    def agreement(a: np.ndarray, b: np.ndarray) -> float:
        same = task.predictions(a, recipe.task.threshold) == task.predictions(b, recipe.task.threshold)
        return float(np.mean(same.all(axis=-1) if same.ndim > 1 else same))

    def score(logits: np.ndarray) -> float:
        return task.compute_metrics(logits, gold, recipe.task.threshold)[metric]

    fp32 = OnnxPredictor.from_dir(target).logits_from_features(features)
    results |= {"onnx_fp32": score(fp32), "onnx_fp32_agreement": agreement(fp32, torch_logits)}
    if int8:
        # Dynamic quantization scales activations by the range of the whole batch, padding included, so an
        # int8 answer depends a little on what it was batched with: both extremes are measured, and guarded.
        alone = OnnxPredictor.from_dir(target, int8=True, batch_size=1).logits_from_features(features)
        batched = OnnxPredictor.from_dir(target, int8=True, batch_size=SERVING_BATCH).logits_from_features(features)
        results |= {"onnx_int8": score(batched), "onnx_int8_agreement": agreement(batched, torch_logits),
                    "onnx_int8_alone": score(alone), "onnx_int8_alone_vs_batched_agreement": agreement(alone, batched)}
        worst = min(results["onnx_int8"], results["onnx_int8_alone"]) if greater else \
            max(results["onnx_int8"], results["onnx_int8_alone"])
        drop = (results["onnx_fp32"] - worst) * (1 if greater else -1)
        if drop > MAX_INT8_DROP:
            (target / INT8_FILE).unlink(missing_ok=True)
            raise ExportError(
                f"int8 quantization costs too much: {metric} {results['onnx_int8']:.4f} in batches of {SERVING_BATCH} "
                f"and {results['onnx_int8_alone']:.4f} one input at a time, against {results['onnx_fp32']:.4f} in fp32 "
                f"(more than {MAX_INT8_DROP:.2f} worse; agreement {results['onnx_int8_agreement']:.3f}). "
                f"{INT8_FILE} was removed; the fp32 {ONNX_FILE} is kept."
            )
    return results
