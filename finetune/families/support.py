"""What a family offers a recipe, and why not where it does not: the checks `finetune validate` and `finetune run`
share, and the support table `finetune validate` prints for a model type no family module covers.

The structure checks (a layer list to freeze or decay, the embeddings, LoRA targets) look at the task model built
on PyTorch's meta device from the checkpoint's config: every module and parameter shape, no weights, in a few
milliseconds, before anything is loaded or trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.families.base import Family, HEAD_MAPPINGS
from finetune.families.registry import family_of

HEAD_NAMES = {
    "AutoModelForSequenceClassification": "sequence-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForMultipleChoice": "multiple-choice",
    "AutoModelForMaskedLM": "masked-LM",
}


def meta_model(config: Any, auto_model: str, trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The task model of `config` built on the meta device (structure only), or None when transformers cannot build
    it (no such head, or code the recipe does not allow to run)."""
    import transformers

    try:
        with torch.device("meta"):
            return getattr(transformers, auto_model).from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, ImportError, AttributeError, RuntimeError):
        return None


def linear_names(encoder: torch.nn.Module) -> list[str]:
    """The last name part of every linear layer inside the encoder: what LoRA's `target_modules` may name."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in encoder.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def default_lora_targets(family: Family, encoder: torch.nn.Module) -> tuple[list[str] | None, str | None]:
    """The family's default LoRA targets (names of linear layers of the encoder), or None and why there are none."""
    have = linear_names(encoder)
    if not family.lora_targets:
        return None, (f"no default LoRA targets for {family.name}: name the linear layers to adapt in "
                      f"model.adapter.target_modules, from: {', '.join(have)}")
    missing = [t for t in family.lora_targets if t not in have]
    if missing:
        return None, (f"the {family.name} default LoRA targets {', '.join(missing)} are not linear layers of this "
                      f"checkpoint; name them in model.adapter.target_modules, from: {', '.join(have)}")
    return list(family.lora_targets), None


@dataclass
class Structure:
    """What a family's checks read from a meta-device model."""

    layers: int | None
    """How many layers the layer list holds (None: no layer list found)."""
    embeddings: list[str]
    """Paths of the modules counted as embeddings."""
    linear: list[str]
    lora: list[str] | None
    lora_problem: str | None


def structure(family: Family, config: Any, auto_model: str, trust_remote_code: bool = False) -> Structure | None:
    """The structure of the task model `auto_model` of `config` (None: it cannot be built)."""
    model = meta_model(config, auto_model, trust_remote_code)
    if model is None:
        return None
    encoder = family.encoder(model)
    layers = family.layers(encoder, config)
    lora, problem = default_lora_targets(family, encoder)
    return Structure(None if layers is None else len(layers.modules), [p for p, _ in family.embeddings(encoder)],
                     linear_names(encoder), lora, problem)


def _head_problem(family: Family, config: Any, task: Any) -> str | None:
    if family.has_head(config, task.auto_model):
        return None
    able = [HEAD_NAMES[auto] for auto in HEAD_MAPPINGS if family.has_head(config, auto)]
    return (f"task.type {task.name}: transformers has no {HEAD_NAMES[task.auto_model]} head for {config.model_type} "
            f"checkpoints ({task.auto_model} has none); {config.model_type} checkpoints have "
            f"{', '.join(able) or 'no task'} heads")


def recipe_problems(config: Any, recipe: Any, task: Any) -> list[str]:
    """Every problem between a recipe (its model and training sections, and `task`, the task definition) and the
    checkpoint's family, one message each naming the field and what is allowed."""
    family = family_of(config)
    model, training = recipe.model, recipe.training
    problems: list[str] = []
    trust = bool(getattr(model, "trust_remote_code", False))
    head = None if trust else _head_problem(family, config, task)
    if head:
        problems.append(head)
    usable = family.usable_positions(config)
    if usable is not None and model.max_length > usable:
        offset = family.position_offset(config)
        why = (f" ({config.max_position_embeddings} position embeddings, the first {offset} never used by "
               f"{family.name})" if offset else "")
        problems.append(f"model.max_length: {model.max_length} is longer than the checkpoint's {usable} positions"
                        f"{why}; allowed: at most {usable}")
    if model.attention_dropout is not None and (family.attention_dropout_key is None
                                                or not hasattr(config, family.attention_dropout_key)):
        problems.append(f"model.attention_dropout: {model.checkpoint} ({config.model_type}) has no attention dropout "
                        "setting in its config; remove the field")
    problems.extend(family.check_settings(config, model))
    pooling = getattr(model, "pooling", "auto")
    if pooling != "auto":
        if not task.pooled_head:
            problems.append(f"model.pooling: {pooling} is for the tasks whose head reads one vector per input "
                            f"(classification, multi_label, regression, multiple_choice), not {task.name}; remove it")
        else:
            why = family.pooling_problem(config, pooling)
            if why:
                problems.append(f"model.pooling: {pooling}: {why}")
    wants_layers = (isinstance(training.freeze, int) and not isinstance(training.freeze, bool)) \
        or training.layer_lr_decay is not None
    wants_embeddings = training.freeze == "embeddings" or wants_layers
    if head or trust or not (wants_layers or wants_embeddings or model.adapter is not None):
        return problems
    found = structure(family, config, task.auto_model)
    if found is None:
        return problems
    if wants_layers and found.layers is None:
        key = "training.freeze" if training.layer_lr_decay is None else "training.layer_lr_decay"
        problems.append(f"{key}: finetune cannot find the encoder's layer list in {config.model_type} (no single "
                        f"list of {family.layer_count(config)} layers), so it cannot tell layers apart; allowed: "
                        "training.freeze none or encoder, no layer_lr_decay")
    elif wants_embeddings and not found.embeddings:
        problems.append(f"training.freeze: {training.freeze}: finetune cannot find the embeddings of {config.model_type}; "
                        "allowed: none or encoder")
    if model.adapter is not None:
        asked = model.adapter.target_modules
        if asked is None and found.lora is None:
            problems.append(f"model.adapter.target_modules: {found.lora_problem}")
        elif asked is not None:
            missing = [t for t in asked if t not in found.linear]
            if missing:
                problems.append(f"model.adapter.target_modules: the model has no linear layer named "
                                f"{', '.join(missing)}; its encoder's linear layers are: {', '.join(found.linear)}")
    return problems


@dataclass
class Offer:
    """One feature for one checkpoint: offered (`reason` None) or not, and why."""

    feature: str
    reason: str | None


def offers(config: Any, tasks: dict[str, Any]) -> list[Offer]:
    """What the checkpoint's family offers, feature by feature (`tasks`: the task registry, for the heads)."""
    family = family_of(config)
    heads = {name: _head_problem(family, config, task) for name, task in tasks.items()}
    out = [Offer("tasks " + ", ".join(name for name, problem in heads.items() if problem is None), None)]
    out += [Offer(f"task {name}", problem) for name, problem in heads.items() if problem is not None]
    found = structure(family, config, "AutoModelForSequenceClassification") or \
        structure(family, config, next((t.auto_model for t in tasks.values() if family.has_head(config, t.auto_model)),
                                       "AutoModel"))
    layers = None if found is None or found.layers is not None else \
        "no single list of the encoder's layers was found"
    out.append(Offer("training.freeze N, training.layer_lr_decay", layers))
    out.append(Offer("training.freeze embeddings", None if found is not None and found.embeddings else
                     "the embeddings were not found"))
    out.append(Offer("model.adapter (LoRA) with default targets", found.lora_problem if found else "no model"))
    mlm = None if family.mlm_head else "its masked-LM head is not known: pretraining computes every position's logits"
    out.append(Offer("masked-positions shortcut of finetune pretrain", mlm))
    out.append(Offer("model.pooling first/mean", family.pooling_problem(config, "mean")))
    out.append(Offer("finetune export (ONNX)", family.export_problem(config)))
    out.append(Offer("finetune convert --to fewer-layers", layers))
    return out
