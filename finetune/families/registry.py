"""The registry of model families: a checkpoint's `config.model_type` finds its family here (never an import path)."""

from __future__ import annotations

from typing import Any

from finetune.families.base import Family

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make a family known to every feature (freezing, adapters, pretraining, conversion, export, validate)."""
    if not family.name:
        raise ValueError("a family needs a name (the model type transformers gives its checkpoints)")
    for other in FAMILIES.values():
        shared = [t for t in (family.model_types or (family.name,)) if other.covers(t) and other.name != family.name]
        if shared:
            raise ValueError(f"family {family.name}: model type {shared[0]} is already covered by {other.name}")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Forget a family (for code that registered one for a while, such as a test)."""
    FAMILIES.pop(name, None)


def family_of(thing: Any) -> Family:
    """The family of a config, a model (task model, peft model, encoder) or a model type string; a model type no
    family covers gets the generic stand-in (`finetune.families.generic`), which reads what it can from the model."""
    if isinstance(thing, str):
        model_type, config = thing, None
    else:
        config = getattr(thing, "config", thing)
        model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type is not None and family.covers(model_type):
            return family
    from finetune.families.generic import GenericFamily

    return GenericFamily(config if config is not None else type("Config", (), {"model_type": model_type})())
