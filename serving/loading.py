"""The model to serve, with what the service reports about it (name, registry version, run)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import ModelSourceError
from finetune.models.adapters import SharedAdapters, merge_for_serving, share_base, shared_pass_key
from finetune.models.predictor import Predictor
from finetune.tracking.sources import locate, load_predictor

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    predictor: Predictor
    name: str
    version: str | None
    run_id: str | None
    source: str
    shared: SharedAdapters | None = None
    """The adapter models whose forward passes this one shares (`share_passes`), None when it runs alone."""
    merged: bool = False
    """An adapter model served alone, its adapter folded into its base weights (`merge_for_serving`)."""


def load_model(source: str | None = None, name: str | None = None, backend: str = "auto",
               precision: str = "fp32", served_as: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load what `finetune serve` was asked to serve: any model source (`finetune.tracking.sources`), by
    default the registry's champion. Its name, which answers carry, is `served_as` (NAME of --model NAME=SOURCE),
    else `served_name`."""
    found = locate(source, name)
    predictor = load_predictor(found, backend, precision, device)
    return LoadedModel(predictor, served_as or served_name(found), found.version, found.run_id, found.source)


def served_name(found: Any) -> str:
    """The name a model is served as when not given one: its registered name, its MLflow run, else its folder's (the run's folder
    for runs/<name>/best, since every run's model folder is called best), never the recipe's name inside it, which
    two differently trained folders can share."""
    if found.name:
        return found.name
    if found.run_id:  # runs:/ID/model, downloaded into a folder whose name says nothing
        return f"run-{found.run_id}"
    folder = Path(found.path).resolve()
    return folder.parent.name if folder.name == "best" and folder.parent.name else folder.name


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
                precision: str = "fp32", device: str = "cpu") -> tuple[LoadedModel, dict[str, LoadedModel]]:
    """The default model and every named one (`parse_model_specs`). Adapter models on the same base (the same weights
    digest) share one copy of the base's weights in memory, and those that can also share forward passes do
    (`share_passes`); an adapter model whose base nothing else holds runs with its adapter merged in
    (`merge_for_serving`)."""
    loaded = {spec_name: load_model(source, name, backend, precision, spec_name, device) for spec_name, source in specs}
    groups: dict[str, list[LoadedModel]] = {}
    for model in loaded.values():
        adapter = model.predictor.info.adapter
        if adapter and hasattr(model.predictor.model, "peft_config"):
            groups.setdefault((adapter.get("base") or {}).get("digest", ""), []).append(model)
    for group in groups.values():
        share_base([m.predictor.model for m in group])
    share_passes([m for n, m in loaded.items() if n is not None])
    for group in groups.values():
        if len(group) == 1 and group[0].shared is None and merge_for_serving(group[0].predictor):
            group[0].merged = True  # its base weights are its own: the adapter is folded into them
    first = next(iter(loaded.values()))
    return first, {n: m for n, m in loaded.items() if n is not None}


def share_passes(models: list[LoadedModel]) -> list[SharedAdapters]:
    """Adapter models that can answer in one forward pass (the same `shared_pass_key`: one base, task, head shape,
    padding, device and precision) get one `SharedAdapters`, set as each one's `shared`; the server then gives them
    one batcher. Models that cannot (other tasks or label counts, ONNX, BigBird, a family whose mixed batch does not
    give each model its own outputs) keep running alone. Returns the groups made."""
    groups: dict[str, list[LoadedModel]] = {}
    for model in models:
        key = shared_pass_key(model.predictor)
        if key is not None:
            groups.setdefault(key, []).append(model)
    made = []
    for group in groups.values():
        if len(group) < 2:
            continue
        try:
            shared = SharedAdapters({m.name: m.predictor for m in group})
        except Exception as e:  # each still answers alone, as it did before passes were shared
            log.warning("models %s answer in forward passes of their own: %s", ", ".join(m.name for m in group),
                        shown(e))
            continue
        for model in group:
            model.shared = shared
        made.append(shared)
    return made


def sharing_line(shared: SharedAdapters) -> str:
    """What the server says at start-up about models that share forward passes (the base's name as finetune.json
    gives it, its control characters escaped)."""
    return f"models {', '.join(shared.names)} share one base pass (LoRA adapters of {shown(shared.base)})"


def shown(text: object) -> str:
    """Text from a model folder as a terminal line shows it: control characters (escape sequences that would
    recolour, move or retitle the terminal) written as escapes. serving.cli's `shown` does the same; importing it
    here would make an import circle (serving.cli loads the models through this module)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))
