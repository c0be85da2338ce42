"""LoRA adapters with the peft library (`model.adapter`): adding one, saving and loading the adapter model, merging it.

An adapter model folder holds peft's `adapter_config.json` and `adapter_model.safetensors` (the low-rank updates
and the task head, which peft saves as `modules_to_save`), the task model's `config.json` (labels, head size),
the tokenizer and `finetune.json`, whose `adapter` entry names the base checkpoint and a digest of its weights. So
it is a few MB, and loading it means loading the base, putting a head of the saved shape on it and the adapter on
top; a base that cannot be found, or whose weights are not the ones the adapter was trained on, is refused, naming
what is missing. `finetune export` merges the adapter into the base first (`merged`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from finetune.errors import CheckpointError, RecipeError
from finetune.families import family_of
from finetune.families.pooling import CONFIG_KEY as POOLING_KEY
from finetune.families.pooling import install_pooling
from finetune.families.support import default_lora_targets, linear_names
from finetune.models.pretrained import check_weights_format, resolve_checkpoint

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

def is_adapter_model(model: Any) -> bool:
    return hasattr(model, "peft_config")


def is_adapter_folder(path: Path | str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def head_modules(model: torch.nn.Module) -> list[str]:
    """The task head: the model's top-level modules with weights, other than the encoder (BERT: classifier, and the
    pooler inside the encoder that the head reads, `Family.head_pooler`; DistilBERT: pre_classifier and classifier;
    ModernBERT: head and classifier; QA: qa_outputs). peft matches the names as suffixes of module paths."""
    from finetune.models.layers import head_pooler

    pooler = family_of(model.config).head_pooler
    return [name for name, child in model.named_children()
            if name != model.base_model_prefix and any(True for _ in child.parameters())] + \
        ([pooler] if head_pooler(model) is not None else [])


def target_modules(model: torch.nn.Module, asked: list[str] | None) -> list[str]:
    """The layers to adapt: the recipe's, else the family's default (`Family.lora_targets`: the attention query and
    value projections, ModernBERT's fused projection).

    Raises RecipeError naming the ones the model has when it lacks any of them.
    """
    family = family_of(model.config)
    encoder = family.encoder(model)
    have = linear_names(encoder)
    if asked is None:
        default, problem = default_lora_targets(family, encoder)
        if default is None:
            raise RecipeError(f"model.adapter.target_modules: {problem}")
        return default
    missing = [t for t in asked if t not in have]
    if missing:
        raise RecipeError(f"model.adapter.target_modules: the model has no linear layer named {', '.join(missing)}; "
                          f"its encoder's linear layers are: {', '.join(have)}")
    return list(asked)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the encoder's weights (names and bytes), to tell later that a base is the one an adapter was trained on."""
    encoder = getattr(model, model.base_model_prefix)
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(re.sub(r"\.base_layer\.", ".", name).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def add_adapter(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """Wrap a task model with a fresh LoRA adapter (`cfg`: the recipe's AdapterSection); only the adapter and the
    head train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=target_modules(model, cfg.target_modules), modules_to_save=head_modules(model),
                        bias="none")
    return get_peft_model(model, config)


def adapter_settings(model: torch.nn.Module, cfg: Any, base: dict[str, Any]) -> dict[str, Any]:
    """finetune.json's `adapter` entry: the adapter's settings and the base it applies to."""
    peft_config = model.peft_config["default"]
    return {"type": cfg.type, "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "target_modules": sorted(peft_config.target_modules), "head": list(peft_config.modules_to_save or []),
            "base": base}


def base_reference(checkpoint: str, revision: str | None, resolved_path: Path, source: str, digest: str) -> dict[str, Any]:
    """How an adapter names its base: the hub id as the recipe gave it (found again through the mirror, packages or
    hub), or the absolute folder, plus the digest of the weights it was trained on."""
    return {"checkpoint": str(resolved_path) if source == "local" else checkpoint, "revision": revision,
            "digest": digest}


def resolve_base(adapter: dict[str, Any]) -> Path:
    """The base checkpoint's folder on this machine, or a CheckpointError saying what is missing."""
    base = adapter.get("base") or {}
    name = base.get("checkpoint")
    if not name:
        raise CheckpointError("this adapter model does not name its base checkpoint (finetune.json adapter.base.checkpoint)")
    try:
        return resolve_checkpoint(name, base.get("revision")).path
    except CheckpointError as e:
        raise CheckpointError(f"this adapter model applies to the base checkpoint {name!r}, which cannot be loaded here: {e}"
                              ) from None


def load_adapter_model(path: Path | str, task: Any, adapter: dict[str, Any], base_path: Path | str | None = None):
    """The adapter model of a saved folder: the base (found from finetune.json unless `base_path` is given) with a
    head of the saved shape, the adapter and head weights loaded on top; in eval mode, not merged."""
    from peft import PeftModel
    from transformers import AutoConfig

    from finetune.models.modeling import model_class

    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path} is an adapter model without {ADAPTER_WEIGHTS} (safetensors only)")
    base_path = Path(base_path) if base_path is not None else resolve_base(adapter)
    check_weights_format(base_path, allow_pickle=False)
    head_config = AutoConfig.from_pretrained(path)
    extra = {k: getattr(head_config, k) for k in ("id2label", "label2id", "num_labels", "problem_type")
             if getattr(head_config, k, None) is not None}
    # What the head reads is in the task model's config (model.pooling): the base gets it too.
    own = family_of(head_config).pooling_key
    for key in ("attention_type", "block_size", "num_random_blocks") + ((own,) if own else ()):
        if getattr(head_config, key, None) is not None:
            extra[key] = getattr(head_config, key)
    model = model_class(task).from_pretrained(base_path, use_safetensors=True, **extra)
    if getattr(head_config, POOLING_KEY, None) is not None:
        setattr(model.config, POOLING_KEY, getattr(head_config, POOLING_KEY))
    install_pooling(model)
    want = (adapter.get("base") or {}).get("digest")
    if want and weights_digest(model) != want:
        raise CheckpointError(
            f"the base checkpoint {adapter['base'].get('checkpoint')!r} found at {base_path} is not the one this adapter "
            f"was trained on (weights digest {weights_digest(model)[:19]}..., expected {want[:19]}...); put the original "
            "checkpoint there")
    return PeftModel.from_pretrained(model, str(path), is_trainable=False).eval()


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain task model with the adapter folded into the base weights (and the trained head), for export."""
    import copy

    return copy.deepcopy(model).merge_and_unload().eval()


def share_base(models: list[torch.nn.Module]) -> int:
    """Make adapter models on the same base hold one copy of its weights: the later models' base parameters become
    the first's (the adapters add to the base's outputs and never change its weights). Returns the parameters shared."""
    if len(models) < 2:
        return 0
    first = {_plain_name(n): p for n, p in models[0].named_parameters() if "lora_" not in n and _in_base(models[0], n)}
    shared = 0
    for other in models[1:]:
        for module_name, module in other.named_modules():
            for name, param in list(module._parameters.items()):
                full = f"{module_name}.{name}" if module_name else name
                if param is None or "lora_" in full or not _in_base(other, full):
                    continue
                mine = first.get(_plain_name(full))
                if mine is not None and mine is not param and mine.shape == param.shape and torch.equal(mine, param):
                    module._parameters[name] = mine
                    shared += 1
    return shared


def _plain_name(name: str) -> str:
    return re.sub(r"\.base_layer\.", ".", name)


def _in_base(model: Any, name: str) -> bool:
    return f".{model.base_model_prefix}." in f".{name}"
