"""The MLflow model of a run: how it is written, and how it is read back without running its code.

A logged model is MLflow's transformers flavour (usable with `mlflow.transformers.load_model`) whose
pyfunc flavour is this module: `mlflow.pyfunc.load_model(uri).predict(inputs)` answers through
`Predictor`, i.e. the same task definition as evaluation and the HTTP server. The finetune package
travels with the model (`code/`), so it loads where finetune is not installed.

finetune itself never loads a model through `mlflow.pyfunc.load_model`, which would import the code
shipped inside the model: `load_logged_model` reads the weights (safetensors only), the tokenizer and
finetune.json with the installed finetune, and refuses a model finetune did not log.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from finetune.errors import ModelSourceError
from finetune.files import read_yaml, write_atomic
from finetune.models.checksums import write_manifest
from finetune.models.integrity import check_model_folder, load_weights
from finetune.models.modeling import MANIFEST_FILE, METADATA_FILE
from finetune.models.predictor import Predictor
from finetune.tasks import PostprocessOptions

PACKAGE_DIR = Path(__file__).resolve().parents[1]
LOADER_MODULE = "finetune.tracking.mlflow_model"
# Loader modules of models logged by finetune, this version's and earlier ones'.
FINETUNE_LOADERS = (LOADER_MODULE, "finetune.mlflow_model")


class FinetunePyfunc:
    """What `mlflow.pyfunc.load_model` returns the inner object of."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def get_raw_model(self) -> Predictor:
        """The Predictor behind this model (`PyFuncModel.get_raw_model()` returns it)."""
        return self.predictor

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Answers for a list of texts ([text, text_pair] for pair models), a single text, or a DataFrame.

        `params` may carry `threshold` (multi-label) and `top_k` (classification).
        """
        inputs = _as_inputs(model_input, self.predictor.info.text_pair, self.predictor.task.structured_inputs)
        params = params or {}
        options = PostprocessOptions(
            threshold=float(params.get("threshold", self.predictor.info.threshold)),
            top_k=int(params["top_k"]) if params.get("top_k") else None,
        )
        return self.predictor.predict(inputs, options)


def _as_inputs(model_input: Any, text_pair: bool, structured: bool = False) -> list[Any]:
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas ships with mlflow
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        if structured:  # QA and multiple choice: one {question, context} / {context, choices} object per row
            return [{k: v for k, v in row.items() if v is not None} for row in model_input.to_dict(orient="records")]
        columns = list(model_input.columns)
        if text_pair and len(columns) >= 2:
            return [[str(a), str(b)] for a, b in zip(model_input[columns[0]], model_input[columns[1]])]
        return [v if isinstance(v, (list, tuple)) else str(v) for v in model_input[columns[0]]]
    if pd is not None and isinstance(model_input, pd.Series):
        model_input = model_input.tolist()
    if isinstance(model_input, (str, dict)):
        return [model_input]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    return list(model_input)


def _load_pyfunc(data_path: str) -> FinetunePyfunc:
    """MLflow's entry point for `mlflow.pyfunc.load_model` (its name is MLflow's convention)."""
    return FinetunePyfunc(predictor_from_data(Path(data_path)))


WEIGHTS_DIR, TOKENIZER_DIR = "model", "components/tokenizer"  # the transformers flavour's layout


def _check_data(root: Path):
    """`check_model_folder` on a logged model's data folder (model/, components/tokenizer/, finetune.json)."""
    for needed in (METADATA_FILE, f"{WEIGHTS_DIR}/config.json", TOKENIZER_DIR):
        if not (root / needed).exists():
            raise ModelSourceError(f"{root} is not a model logged by finetune: it has no {needed}")
    return check_model_folder(root, root / WEIGHTS_DIR, root / TOKENIZER_DIR)


def predictor_from_data(root: Path) -> Predictor:
    """The Predictor of a logged model's data folder, once `check_model_folder` passes."""
    checked = _check_data(root)
    return Predictor(load_weights(checked), checked.tokenizer, checked.info)


def _record_checksums(root: Path) -> None:
    """checksums.json of a data folder MLflow has written (it saves the weights and tokenizer again itself), with
    finetune.json, so the labels and settings are verified like the weights."""
    files = [p.relative_to(root).as_posix() for sub in (WEIGHTS_DIR, TOKENIZER_DIR)
             for p in (root / sub).rglob("*") if p.is_file()]
    write_manifest(root, files + ([METADATA_FILE] if (root / METADATA_FILE).is_file() else []), MANIFEST_FILE)


def data_folder(mlflow_dir: Path) -> Path:
    """The folder of a downloaded MLflow model that holds finetune's files, refusing models finetune did not log.

    The pyfunc flavour's data folder is the model root for the transformers flavour and data/<name> for
    pyfunc-only models.
    """
    from mlflow.models import Model

    try:
        # Read bounded (size, nesting, aliases: finetune.files) before MLflow builds anything from it.
        flavor = Model.from_dict(read_yaml(Path(mlflow_dir) / "MLmodel")).flavors.get("python_function") or {}
    except Exception as e:  # a malformed MLmodel file, or one finetune.files refuses
        raise ModelSourceError(f"{mlflow_dir} is not a readable MLflow model ({type(e).__name__}: {str(e)[:200]})") from None
    if flavor.get("loader_module") not in FINETUNE_LOADERS:
        raise ModelSourceError(
            f"{mlflow_dir} was not logged by finetune (its pyfunc loader is {flavor.get('loader_module')!r}); finetune "
            "loads only its own models, from their safetensors weights, and never runs code shipped with a model")
    data = Path(mlflow_dir) / str(flavor.get("data", "."))
    if not data.resolve().is_relative_to(Path(mlflow_dir).resolve()):
        raise ModelSourceError(f"{mlflow_dir}/MLmodel: its data path {str(flavor.get('data'))[:80]!r} is outside the "
                               "model folder; finetune reads a model's files from the model only")
    return data


def load_logged_model(mlflow_dir: Path) -> Predictor:
    """The Predictor of a downloaded MLflow model that finetune logged, read with the installed finetune."""
    return predictor_from_data(data_folder(mlflow_dir))


def unpack_model_folder(mlflow_dir: Path, target: Path, recipe_yaml: str | None) -> Path:
    """The model folder training wrote, rebuilt from a logged MLflow model (weights, tokenizer, finetune.json).

    `recipe_yaml` (the run's recipe.yaml) is written beside them when given.
    """
    root = data_folder(mlflow_dir)
    _check_data(root)  # the copy gets checksums of its own, so the original is verified first
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / WEIGHTS_DIR, target, dirs_exist_ok=True)
    shutil.copytree(root / TOKENIZER_DIR, target, dirs_exist_ok=True)
    (target / MANIFEST_FILE).unlink(missing_ok=True)
    shutil.copy(root / METADATA_FILE, target / METADATA_FILE)
    if recipe_yaml is not None:
        write_atomic(target / "recipe.yaml", recipe_yaml)
    # Last, so that it lists finetune.json too, as a folder training saved does (the recipe is not listed there).
    write_manifest(target, [p.relative_to(target).as_posix() for p in target.rglob("*")
                            if p.is_file() and p.name != "recipe.yaml"], MANIFEST_FILE)
    return target


def _pip_requirements() -> list[str]:
    # Given explicitly: otherwise MLflow infers them by importing the model, which pulls
    # torchvision and fails beside the CPU torch wheel.
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "mlflow")]


def build_mlflow_model(model_dir: Path, target: Path) -> None:
    """Write an MLflow model folder: the transformers flavour, with a pyfunc that uses our task definitions.

    The transformers flavour keeps the model usable with `mlflow.transformers.load_model`; the
    pyfunc flavour is replaced by this module so `mlflow.pyfunc` predictions go through
    exactly the post-processing that evaluation and the server use. The finetune package travels
    with the model (`code/`), so it loads where finetune is not installed.
    """
    from mlflow.models import Model, infer_signature
    from mlflow.pyfunc import add_to_model

    predictor = Predictor.from_dir(model_dir)
    info = predictor.info
    example = [predictor.task.example_input(info.text_pair)]
    if predictor.task.pipeline_task is None or predictor.info.adapter:
        # Adapter models too: the transformers flavour would save the peft adapter with a base only the hub can give.
        _save_pyfunc_only(predictor, model_dir, target)
        return
    mlflow.transformers.save_model(
        transformers_model={"model": predictor.model, "tokenizer": predictor.tokenizer},
        path=str(target),
        task=predictor.task.pipeline_task,
        pip_requirements=_pip_requirements(),
    )
    mlmodel = Model.load(str(target / "MLmodel"))
    python_function = mlmodel.flavors.pop("python_function")
    shutil.copy(model_dir / METADATA_FILE, target / METADATA_FILE)
    _record_checksums(target)
    shutil.copytree(PACKAGE_DIR, target / "code" / "finetune", ignore=shutil.ignore_patterns("__pycache__"))
    add_to_model(
        mlmodel,
        loader_module=LOADER_MODULE,
        data=".",
        code="code",
        env=python_function.get("env"),
    )
    if not isinstance(example[0], dict):  # a dict signature would make MLflow turn inputs into a DataFrame
        mlmodel.signature = infer_signature(example)
    mlmodel.save(str(target / "MLmodel"))


def _save_pyfunc_only(predictor: Predictor, model_dir: Path, target: Path) -> None:
    """A pyfunc-only MLflow model for tasks with no transformers pipeline (multiple choice), and adapter models.

    The folder the loader reads has the transformers flavour's layout (model/, components/tokenizer/,
    finetune.json), so this module loads both kinds the same way.
    """
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "finetune_model"
        if predictor.info.adapter:  # the adapter, the head and the base reference: a few MB
            shutil.copytree(model_dir, staged / "model", ignore=shutil.ignore_patterns("MODEL_CARD.md"))
        else:
            predictor.model.save_pretrained(staged / "model", safe_serialization=True)
        predictor.tokenizer.save_pretrained(staged / "components" / "tokenizer")
        shutil.copy(model_dir / METADATA_FILE, staged / METADATA_FILE)
        _record_checksums(staged)
        mlflow.pyfunc.save_model(
            str(target), loader_module=LOADER_MODULE, data_path=str(staged), code_paths=[str(PACKAGE_DIR)],
            pip_requirements=_pip_requirements(),
        )
