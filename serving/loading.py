"""The model to serve, with what the service reports about it (name, registry version, run)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.models.predictor import Predictor
from finetune.tracking.sources import locate, load_predictor


@dataclass
class LoadedModel:
    predictor: Predictor
    name: str
    version: str | None
    run_id: str | None
    source: str


def load_model(source: str | None = None, name: str | None = None, backend: str = "auto",
               precision: str = "fp32") -> LoadedModel:
    """Load what `finetune serve` was asked to serve: any model source (`finetune.tracking.sources`), by
    default the registry's champion."""
    found = locate(source, name)
    predictor = load_predictor(found, backend, precision)
    return LoadedModel(predictor, found.name or predictor.info.recipe_name or found.path.name, found.version,
                       found.run_id, found.source)
