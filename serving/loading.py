"""The model to serve, with what the service reports about it (name, registry version, run)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from finetune.errors import ModelSourceError
from finetune.models.adapters import share_base
from finetune.models.predictor import Predictor
from finetune.tracking.sources import locate, load_predictor

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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


def parse_model_specs(values: list[str] | None) -> list[tuple[str | None, str | None]]:
    """`--model` values as (name, source): one plain SOURCE (unnamed, as before), or NAME=SOURCE for each of several.

    Raises ModelSourceError naming the value that does not fit (a bad or repeated name, several unnamed sources).
    """
    if not values:
        return [(None, None)]
    specs: list[tuple[str | None, str | None]] = []
    for value in values:
        name, _, source = value.partition("=")
        if source and MODEL_NAME.fullmatch(name):
            specs.append((name, source))
        else:
            specs.append((None, value))
    unnamed = [s for n, s in specs if n is None]
    if len(specs) > 1 and unnamed:
        raise ModelSourceError(f"--model {unnamed[0]!r}: with several --model options each needs a name, as NAME=SOURCE "
                               "(NAME: letters, digits, '.', '_' or '-', at most 64)")
    names = [n for n, _ in specs if n is not None]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ModelSourceError(f"--model: the name {repeated[0]!r} is given more than once; each model needs its own")
    return specs


def load_models(specs: list[tuple[str | None, str | None]], name: str | None = None, backend: str = "auto",
                precision: str = "fp32") -> tuple[LoadedModel, dict[str, LoadedModel]]:
    """The default model and every named one (`parse_model_specs`). Adapter models on the same base (the same weights
    digest) share one copy of the base's weights in memory."""
    loaded = {spec_name: load_model(source, name, backend, precision) for spec_name, source in specs}
    groups: dict[str, list[LoadedModel]] = {}
    for model in loaded.values():
        adapter = model.predictor.info.adapter
        if adapter and hasattr(model.predictor.model, "peft_config"):
            groups.setdefault((adapter.get("base") or {}).get("digest", ""), []).append(model)
    for group in groups.values():
        share_base([m.predictor.model for m in group])
    first = next(iter(loaded.values()))
    return first, {n: m for n, m in loaded.items() if n is not None}
