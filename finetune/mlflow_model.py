"""The pyfunc side of a logged model: `mlflow.pyfunc.load_model(uri).predict(inputs)`.

MLflow imports this module (from the model's own `code/` folder if finetune is not installed)
and calls `_load_pyfunc` with the model folder. Prediction goes through `Predictor`, i.e. the
same task definition as evaluation and the HTTP server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from finetune.modeling import METADATA_FILE, ModelInfo, Predictor
from finetune.tasks import PostprocessOptions


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
        structured = self.predictor.info.task in ("question_answering", "multiple_choice")
        inputs = _as_inputs(model_input, self.predictor.info.text_pair, structured)
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
    root = Path(data_path)
    info = ModelInfo(**json.loads((root / METADATA_FILE).read_text()))
    from finetune.modeling import load_tokenizer, model_class
    from finetune.tasks import get_task

    model = model_class(get_task(info.task)).from_pretrained(root / "model", use_safetensors=True)
    tokenizer = load_tokenizer(root / "components" / "tokenizer")
    return FinetunePyfunc(Predictor(model, tokenizer, info))


def unpack_model_folder(mlflow_dir: Path, target: Path, recipe_yaml: str | None) -> Path:
    """The model folder training wrote, rebuilt from a logged MLflow model (weights, tokenizer, finetune.json).

    `recipe_yaml` (the run's recipe.yaml) is written beside them when given.
    """
    from mlflow.models import Model

    data = Model.load(str(Path(mlflow_dir) / "MLmodel")).flavors["python_function"].get("data", ".")
    root = Path(mlflow_dir) / data
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "model", target, dirs_exist_ok=True)
    shutil.copytree(root / "components" / "tokenizer", target, dirs_exist_ok=True)
    shutil.copy(root / METADATA_FILE, target / METADATA_FILE)
    if recipe_yaml is not None:
        (target / "recipe.yaml").write_text(recipe_yaml)
    return target
