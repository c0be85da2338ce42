"""Model sources: what `finetune predict`, `export`, `serve` and every other model reader accept.

A source is a model folder (`runs/<name>/best`, a `finetune export` folder or a downloaded MLflow model),
an MLflow run id, a `runs:/<id>/model` URI, a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI, or
nothing (the `champion` of the only registered model that has one). This is the one place that parses
them; MLflow models are read back with `mlflow_model.load_logged_model`, never with
`mlflow.pyfunc.load_model`, so no code shipped inside a model runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import ModelSourceError
from finetune.files import RefusedDocument, read_text
from finetune.models.predictor import Predictor, check_inference_precision

RUN_ID = re.compile(r"[0-9a-f]{32}")
MODELS_URI = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))")
SOURCE_HELP = "a model folder, an MLflow run id, or a runs:/ or models:/ URI (e.g. models:/NAME@champion)"
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


@dataclass
class Located:
    """Where a model is on this machine, and what it is in the registry."""

    path: Path
    name: str | None
    version: str | None
    run_id: str | None
    source: str

    @property
    def is_mlflow_model(self) -> bool:
        return (self.path / "MLmodel").is_file()


def champion_name() -> str:
    """The registered model that has a `champion` alias, when exactly one has."""
    import mlflow

    client = mlflow.MlflowClient()
    names = []
    for model in client.search_registered_models():
        try:
            client.get_model_version_by_alias(model.name, "champion")
            names.append(model.name)
        except Exception:  # no champion alias on this model
            continue
    if len(names) == 1:
        return names[0]
    if not names:
        raise ModelSourceError(
            "no registered model has a champion yet: train a recipe with tracking.register_as set "
            "(recipes/quickstart.yaml does), or give a run id or a model folder"
        )
    raise ModelSourceError(f"several registered models have a champion ({', '.join(sorted(names))}); choose one with --name")


# What marks a folder as a model (finetune's, an MLflow model, an ONNX export, or a plain save_pretrained one).
_MODEL_MARKS = ("finetune.json", "MLmodel", "config.json", "model.onnx")


def check_not_run_folder(folder: Path) -> None:
    """Refuse, with the folder meant, a training run's output folder given where a model is expected: the model
    is its best/ (runs/quickstart is the run, runs/quickstart/best its model)."""
    from finetune.training.outputs import BEST_DIR, MARKER_FILE

    if any((folder / mark).is_file() for mark in _MODEL_MARKS):
        return
    best = folder / BEST_DIR
    if best.is_dir():
        raise ModelSourceError(f"model {str(folder)!r} is a training run's output folder, not a model: did you mean "
                               f"{(folder / BEST_DIR).as_posix()}?")
    if (folder / MARKER_FILE).is_file():
        raise ModelSourceError(f"model {str(folder)!r} is a training run's output folder, and it has no "
                               f"{BEST_DIR}/ model yet (the run has not saved one: see `finetune runs`); give a "
                               f"model folder such as runs/<name>/{BEST_DIR}, a run id or a models:/ URI")


def locate(source: str | None = None, name: str | None = None, store: str | None = None) -> Located:
    """Find (downloading if needed) the model a source names; see the module docstring for the sources.

    Without a source, the `champion` alias of `name` (or of the only registered model that has one). store: the
    tracking URI to look in (a recipe's `tracking.tracking_uri`); default `tracking_uri()`.
    """
    import mlflow

    from finetune.tracking.store import existing_store

    if source and Path(source).is_dir():
        check_not_run_folder(Path(source))
        return Located(Path(source), None, None, None, str(source))
    if source is not None and not (RUN_ID.fullmatch(source) or source.startswith(("models:/", "runs:/"))):
        raise ModelSourceError(f"model {source!r}: there is no such folder, and it is not an MLflow run id or URI; "
                               f"give {SOURCE_HELP}")
    store = existing_store(store)  # reading a model never creates a store
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    version = run_id = None
    if source is None:
        source = f"models:/{name or champion_name()}@champion"
    if RUN_ID.fullmatch(source):
        source = f"runs:/{source}/model"
    if source.startswith("models:/"):
        match = MODELS_URI.fullmatch(source)
        if not match:
            raise ModelSourceError(f"model {source!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        model_name, alias, number = match.groups()
        try:
            found = (client.get_model_version_by_alias(model_name, alias) if alias
                     else client.get_model_version(model_name, number))
        except Exception as e:
            raise ModelSourceError(f"model {source!r}: not in the registry at {store} ({e})") from None
        name, version, run_id = model_name, str(found.version), found.run_id
    else:
        run_id = source.split("/")[1]
    try:
        local = Path(mlflow.artifacts.download_artifacts(source))
    except Exception as e:
        raise ModelSourceError(f"model {source!r}: cannot fetch it from {store} ({e})") from None
    return Located(local, name, version, run_id, source)


def load_predictor(found: Located, backend: str = "auto", precision: str = "fp32", device: str = "cpu") -> Predictor:
    """The Predictor of a located model.

    backend: `auto` (ONNX Runtime for a folder with model.onnx, else PyTorch), `torch`, `onnx` or `onnx-int8`
    (both need a `finetune export` folder). precision applies to the PyTorch backend (see
    `check_inference_precision`); bf16 makes `auto` choose PyTorch. device (cpu, cuda, auto) is where PyTorch runs
    it; ONNX Runtime runs on the CPU.
    """
    from finetune.export.onnx import ONNX_FILE, OnnxPredictor
    from finetune.tracking.mlflow_model import load_logged_model

    if backend not in BACKENDS:
        raise ModelSourceError(f"backend {backend!r}: allowed values are {', '.join(BACKENDS)}")
    onnx = backend in ("onnx", "onnx-int8")
    if precision != "fp32":
        if onnx:
            raise ModelSourceError(f"--precision {precision} is for the PyTorch backend (--backend torch or auto); "
                                   f"ONNX Runtime runs the export as it was made (fp32, or int8 with --backend onnx-int8)")
        backend = "torch"
    if found.is_mlflow_model:
        if onnx:
            # ONNX Runtime serves an export, which is made and checked once by `finetune export`, not at start-up.
            raise ModelSourceError(
                f"--backend {backend} serves an ONNX export, and {found.source} is an MLflow model: make the export "
                f"with `finetune export {found.source} DST{' --quantize int8' if backend == 'onnx-int8' else ''}`, "
                f"then `finetune serve --model DST --backend {backend}`")
        predictor = load_logged_model(found.path)
    elif onnx or (backend == "auto" and (found.path / ONNX_FILE).is_file()):
        predictor = OnnxPredictor.from_dir(found.path, int8=backend == "onnx-int8")
    else:
        predictor = Predictor.from_dir(found.path)
    if not predictor.task.serves:
        raise ModelSourceError(predictor.task.not_served(found.source))
    try:
        predictor.precision = check_inference_precision(precision)
        if isinstance(predictor, Predictor) and not isinstance(predictor, OnnxPredictor):
            predictor.to_device(device)
    except ValueError as e:
        raise ModelSourceError(f"--{e}") from None
    return predictor


def model_folder(source: str, target: Path) -> Path:
    """A plain finetune model folder (what training writes to runs/<name>/best) for any source `locate` takes.

    A folder is returned as it is; an MLflow model is unpacked into `target` with its run's recipe.yaml, which
    `finetune export` needs to check the export on the recipe's evaluation data.
    """
    import mlflow

    from finetune.tracking.mlflow_model import unpack_model_folder

    found = locate(source)
    if not found.is_mlflow_model:
        return found.path
    recipe = None
    if found.run_id:
        try:
            downloaded = Path(mlflow.artifacts.download_artifacts(f"runs:/{found.run_id}/recipe.yaml"))
        except Exception:  # an old or foreign run without it: the export then asks for --no-check
            downloaded = None
        if downloaded is not None:
            try:
                recipe = read_text(downloaded)  # bounded: a recipe is a few KB
            except (OSError, RefusedDocument) as e:
                raise ModelSourceError(f"runs:/{found.run_id}/recipe.yaml is refused ({e})") from None
    return unpack_model_folder(found.path, target, recipe)
