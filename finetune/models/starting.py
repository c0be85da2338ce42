"""What a run's model starts from: a pretrained encoder, or a fine-tuned model (full or adapter), and what is reused.

The training layer turns `model.checkpoint` into a `Start` (a folder on this machine, and the parent model's
finetune.json when it is a finetune model); `build_for_run` makes the model to train from it:

- a pretrained checkpoint: its encoder with a fresh head (and a fresh adapter with `model.adapter`);
- a fine-tuned full model: its encoder, and its head when the task and label set are the run's (otherwise a fresh
  head, said plainly with both label sets); with `model.adapter` it is refused, since the adapter's base would be
  that model, which an adapter folder cannot name;
- a fine-tuned adapter model: with `model.adapter`, its adapter keeps training on the same base (its head too when
  task and labels match); without, the adapter is merged into the base and the whole model trains.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import RecipeError
from finetune.families import family_of
from finetune.models import adapters
from finetune.models.modeling import ModelInfo, build_model, load_tokenizer
from finetune.models.pretrained import ResolvedCheckpoint, resolve_checkpoint
from finetune.tasks import Task, get_task


@dataclass
class Start:
    """What `model.checkpoint` names, found on this machine."""

    resolved: ResolvedCheckpoint
    """The pretrained checkpoint's folder, or the parent model's folder."""
    parent: ModelInfo | None = None
    """The parent model's finetune.json, when the checkpoint is a fine-tuned finetune model."""
    parent_source: str | None = None
    """The parent as a stable source (runs:/ID/model, models:/NAME/VERSION, or its absolute folder)."""
    parent_run_id: str | None = None


@dataclass
class BuiltModel:
    """The model a run trains, its tokenizer, and what it was made from."""

    model: Any
    tokenizer: Any
    notes: list[str] = field(default_factory=list)
    """Lines for people: what was reused, what replaced (printed at start, kept in the model card)."""
    head_reused: bool | None = None
    """Parent runs: whether the parent's head was kept."""
    adapter: dict[str, Any] | None = None
    """Adapter runs: finetune.json's `adapter` entry."""


def head_matches(parent: ModelInfo, task: Task, label_names: list[str] | None) -> bool:
    return parent.task == task.name and list(parent.label_names or []) == list(label_names or [])


def _labels(names: list[str] | None) -> str:
    if not names:
        return "no label set"
    return "[" + ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") + "]"


def build_for_run(start: Start, model_cfg: Any, task: Task, label_names: list[str] | None) -> BuiltModel:
    """The model to train (see the module docstring)."""
    parent = start.parent
    if parent is None:
        model, tokenizer = build_model(start.resolved, model_cfg, task, label_names)
        built = BuiltModel(model, tokenizer)
        if model_cfg.adapter is not None:
            _add_adapter(built, model_cfg, model_cfg.checkpoint, start.resolved)
        return built
    same = head_matches(parent, task, label_names)
    said = (f"from {start.parent_source}: its encoder" +
            (f" and its head ({parent.task}, labels {_labels(label_names)})" if same else
             f"; its head ({parent.task}, labels {_labels(parent.label_names)}) is replaced by a fresh one "
             f"({task.name}, labels {_labels(label_names)})"))
    if parent.adapter is None:
        if model_cfg.adapter is not None:
            raise RecipeError(
                f"model.adapter with model.checkpoint {start.parent_source}, a fully fine-tuned model, is not supported: "
                "the adapter's base would be that model, which an adapter folder cannot name. Train the model further "
                "without model.adapter, or start the adapter from the pretrained checkpoint it came from "
                f"({parent.checkpoint or 'see its recipe'})")
        built = full_model_start(start.resolved, model_cfg, task, label_names, same, parent.task)
    elif model_cfg.adapter is not None:
        built = _continue_adapter(start, model_cfg, task, label_names, same)
        said += "; its adapter keeps training on the same base"
    else:
        merged = adapters.merged(adapters.load_adapter_model(start.resolved.path, get_task(parent.task), parent.adapter))
        with tempfile.TemporaryDirectory(prefix="finetune-merged-") as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(start.resolved.path).save_pretrained(tmp)
            built = full_model_start(ResolvedCheckpoint(str(start.parent_source), Path(tmp), "local"), model_cfg, task,
                                label_names, same)
        said += "; its adapter is merged into the base, and the whole model trains"
    built.head_reused = same
    built.notes.insert(0, "Started " + said + ".")
    return built


def full_model_start(folder: ResolvedCheckpoint, model_cfg: Any, task: Task, label_names: list[str] | None,
                same_head: bool, parent_task: str | None = None) -> BuiltModel:
    """A full model folder's encoder, with its head (same task and labels) or a fresh one; from a masked-LM parent
    (`finetune pretrain`), the fresh head starts with what it shares with the trained masked-LM head
    (`Family.mlm_head_shared`), as it would from the hub checkpoint."""
    if same_head:
        # The same labels in the same order give the same head shape and names, so the head loads with the encoder.
        model, tokenizer = build_model(folder, model_cfg, task, label_names)
        model.finetune_fresh_parameters = frozenset()
        return BuiltModel(model, tokenizer)
    from transformers import AutoModel

    # The encoder alone, saved as a plain checkpoint, gets a fresh head exactly as a pretrained one would: nothing of
    # the old head can leak in, even when the new head happens to have the old one's shape.
    with tempfile.TemporaryDirectory(prefix="finetune-encoder-") as tmp:
        AutoModel.from_pretrained(folder.path, use_safetensors=True).save_pretrained(tmp, safe_serialization=True)
        for extra in folder.path.iterdir():
            if extra.name.startswith(("tokenizer", "vocab", "special_tokens", "merges")):
                shutil.copy(extra, Path(tmp) / extra.name)
        model, tokenizer = build_model(ResolvedCheckpoint(folder.name, Path(tmp), "local"), model_cfg, task, label_names)
    built = BuiltModel(model, tokenizer)
    if parent_task == "masked_lm":
        kept = _keep_shared_head(model, folder.path)
        if kept:
            built.notes.append(f"The pretrained masked-LM head's {', '.join(kept)} start the new head, as from a hub "
                               "checkpoint.")
    return built


def _keep_shared_head(model: Any, folder: Path) -> list[str]:
    """Load the weights a masked-LM parent's head shares with the new task head (`Family.mlm_head_shared`: ModernBERT's
    dense + norm), which then count as loaded, not fresh; returns their names."""
    from safetensors import safe_open

    prefixes = family_of(model.config).mlm_head_shared
    if not prefixes:
        return []
    own = model.state_dict()
    shared = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes) and key in own and tuple(f.get_slice(key).get_shape()) == tuple(own[key].shape):
                    shared[key] = f.get_tensor(key)
    if shared:
        model.load_state_dict(shared, strict=False)
        model.finetune_fresh_parameters = frozenset(model.finetune_fresh_parameters) - set(shared)
        new = getattr(model, "finetune_new_weights", None)
        if new is not None:
            new.head = [name for name in new.head if not any(key.startswith(f"{name}.") for key in shared)]
    return sorted(shared)


def _add_adapter(built: BuiltModel, model_cfg: Any, checkpoint: str, resolved: ResolvedCheckpoint) -> None:
    digest = adapters.weights_digest(built.model)
    built.model = adapters.add_adapter(built.model, model_cfg.adapter)
    built.adapter = adapters.adapter_settings(built.model, model_cfg.adapter, adapters.base_reference(
        checkpoint, model_cfg.revision, resolved.path, resolved.source, digest))


def _continue_adapter(start: Start, model_cfg: Any, task: Task, label_names: list[str] | None, same: bool) -> BuiltModel:
    parent = start.parent.adapter
    cfg = model_cfg.adapter
    asked = {"r": cfg.r, "alpha": cfg.alpha}
    differ = [f"{k} {asked[k]} (the parent's is {parent.get(k)})" for k in asked if parent.get(k) != asked[k]]
    if cfg.target_modules is not None and sorted(cfg.target_modules) != sorted(parent.get("target_modules") or []):
        differ.append(f"target_modules {cfg.target_modules} (the parent's are {parent.get('target_modules')})")
    if differ:
        raise RecipeError(f"model.adapter: continuing the adapter of {start.parent_source} needs its settings, but "
                          f"{'; '.join(differ)}. Use the parent's settings, or start a new adapter from its base "
                          f"{(parent.get('base') or {}).get('checkpoint')!r}")
    base_name = (parent.get("base") or {}).get("checkpoint")
    base = resolve_checkpoint(base_name, (parent.get("base") or {}).get("revision"))
    model, tokenizer = build_model(base, model_cfg, task, label_names)
    built = BuiltModel(model, load_tokenizer(start.resolved.path))
    _add_adapter(built, model_cfg, base_name, base)
    if built.adapter["base"]["digest"] != (parent.get("base") or {}).get("digest"):
        raise RecipeError(f"model.checkpoint {start.parent_source}: its base {base_name!r} found at {base.path} is not the "
                          "one its adapter was trained on (the weights differ); put the original base checkpoint there")
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(start.resolved.path / adapters.ADAPTER_WEIGHTS))
    head = tuple(f".{name}." for name in parent.get("head") or [])
    keep = {k: v for k, v in saved.items() if same or not any(h in f".{k}" for h in head)}
    set_peft_model_state_dict(built.model, keep)
    return built
