"""Finding and loading the model to serve: the registry's champion, a run, or a local folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from finetune.modeling import Predictor, check_inference_precision


class ModelSourceError(ValueError):
    """The model to serve cannot be found; the message says what to give instead."""


@dataclass
class LoadedModel:
    predictor: Predictor
    name: str
    version: str | None
    run_id: str | None
    source: str


def _from_mlflow_dir(path: Path) -> Predictor:
    from mlflow.models import Model

    from finetune.mlflow_model import _load_pyfunc

    # The pyfunc's data folder is the model root for the transformers flavour and data/<name> for pyfunc-only models.
    data = Model.load(str(path / "MLmodel")).flavors["python_function"].get("data", ".")
    return _load_pyfunc(str(path / data)).predictor


def _champion_name() -> str:
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
            "(recipes/quickstart.yaml does), or pass --model with a run id or a model folder"
        )
    raise ModelSourceError(f"several registered models have a champion ({', '.join(sorted(names))}); choose one with --name")


def _from_folder(path: Path, backend: str) -> Predictor:
    from finetune.export import ONNX_FILE, OnnxPredictor

    if backend == "onnx-int8" or backend == "onnx" or (backend == "auto" and (path / ONNX_FILE).is_file()):
        return OnnxPredictor.from_dir(path, int8=backend == "onnx-int8")
    return Predictor.from_dir(path)


@dataclass
class Located:
    """Where a model to serve or export is, on this machine, and what it is in the registry."""

    path: Path
    name: str | None
    version: str | None
    run_id: str | None
    source: str

    @property
    def is_mlflow_model(self) -> bool:
        return (self.path / "MLmodel").is_file()


def locate(source: str | None = None, name: str | None = None) -> Located:
    """Find (downloading if needed) the model a source names.

    source: a model folder (runs/<name>/best or an MLflow model folder), an MLflow run id, a runs:/ URI,
    or a models:/ URI. Without a source, the `champion` alias of `name` (or of the only registered
    model that has one).
    """
    import mlflow

    from finetune.tracking import tracking_uri

    if source and Path(source).is_dir():
        return Located(Path(source), None, None, None, str(source))
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    version = run_id = None
    if source is None:
        model_name = name or _champion_name()
        source = f"models:/{model_name}@champion"
    if re.fullmatch(r"[0-9a-f]{32}", source):
        source = f"runs:/{source}/model"
    if source.startswith("models:/"):
        match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", source)
        if not match:
            raise ModelSourceError(f"--model {source!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        model_name, alias, number = match.groups()
        try:
            found = (client.get_model_version_by_alias(model_name, alias) if alias
                     else client.get_model_version(model_name, number))
        except Exception as e:
            raise ModelSourceError(f"--model {source!r}: not in the registry at {tracking_uri()} ({e})") from None
        name, version, run_id = model_name, str(found.version), found.run_id
    elif source.startswith("runs:/"):
        run_id = source.split("/")[1]
    else:
        raise ModelSourceError(f"--model {source!r} is not a folder, a run id, or a runs:/ or models:/ URI")
    try:
        local = Path(mlflow.artifacts.download_artifacts(source))
    except Exception as e:
        raise ModelSourceError(f"--model {source!r}: cannot fetch it from {tracking_uri()} ({e})") from None
    return Located(local, name, version, run_id, source)


def load_model(source: str | None = None, name: str | None = None, backend: str = "auto",
               precision: str = "fp32") -> LoadedModel:
    """Load what `finetune serve` was asked to serve (see `locate` for the sources).

    precision applies to the PyTorch backend (see `check_inference_precision`); asking for bf16 makes
    `auto` choose PyTorch.
    """
    if precision != "fp32":
        if backend in ("onnx", "onnx-int8"):
            raise ModelSourceError(f"--precision {precision} is for the PyTorch backend (--backend torch or auto); "
                                   f"ONNX Runtime runs the export as it was made (fp32, or int8 with --backend onnx-int8)")
        backend = "torch"
    found = locate(source, name)
    if found.is_mlflow_model:
        if backend in ("onnx", "onnx-int8"):
            # ONNX Runtime serves an export, which is made and checked once by `finetune export`, not at start-up.
            raise ModelSourceError(
                f"--backend {backend} serves an ONNX export, and {found.source} is an MLflow model: make the export "
                f"with `finetune export {found.source} DST{' --quantize int8' if backend == 'onnx-int8' else ''}`, "
                f"then `finetune serve --model DST --backend {backend}`")
        predictor = _from_mlflow_dir(found.path)
    else:
        predictor = _from_folder(found.path, backend)
    try:
        predictor.precision = check_inference_precision(precision, predictor.model.config)
    except ValueError as e:
        raise ModelSourceError(f"--{e}") from None
    return LoadedModel(predictor, found.name or predictor.info.recipe_name or found.path.name, found.version,
                       found.run_id, found.source)


def model_folder(source: str, target: Path) -> Path:
    """A plain finetune model folder (what training writes to runs/<name>/best) for any source `locate` takes.

    A folder is returned as it is; an MLflow model is unpacked into `target` with its run's recipe.yaml, which
    `finetune export` needs to check the export on the recipe's evaluation data.
    """
    import mlflow

    found = locate(source)
    if not found.is_mlflow_model:
        return found.path
    from finetune.mlflow_model import unpack_model_folder

    recipe = None
    if found.run_id:
        try:
            recipe = Path(mlflow.artifacts.download_artifacts(f"runs:/{found.run_id}/recipe.yaml")).read_text()
        except Exception:  # an old or foreign run without it: the export then asks for --no-check
            recipe = None
    return unpack_model_folder(found.path, target, recipe)
