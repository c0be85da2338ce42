"""What trains: the encoder's layers by depth, freezing them (`training.freeze`), and caching a frozen encoder.

Depth is read from parameter names, so it works for every BERT-family encoder (and for LoRA parameters
inside them): the embeddings are depth 0, encoder layer i is depth i + 1, anything else inside the encoder
(a final LayerNorm, BigBird's unused pooler) sits on top at depth L + 1, and parameters outside the encoder are
the task head (depth None). Layer-wise learning-rate decay (`finetune.training.optim`) reads the same depths.

BERT's pooler (dense + tanh on the first token, read only by the sequence-classification and multiple-choice
heads) counts as the head, as DistilBERT's pre_classifier does: it trains whatever is frozen, and an adapter saves
it with the head. Frozen, the offline MiniLM's pooler (which sentence-transformers never trained) hands the
classifier outputs of about 0.05, and a linear probe and LoRA r=8 both stayed at the majority class (0.509) on
SST-2 while full fine-tuning reached 0.78 (bench/transfer.py).

With the whole encoder frozen, its output for a text never changes, so `FrozenFeatureCache` computes it once per
distinct input (in eval mode, without dropout) and afterwards hands the head the stored vectors: a linear probe
then costs one encoder pass per text instead of one per text per epoch, and no backward pass through the encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|block|blocks)\.(\d+)\.")


def layer_count(config: Any) -> int | None:
    """How many transformer layers a checkpoint's encoder has (None: the config does not say)."""
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _base_prefix(model: Any) -> str:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    return inner.base_model_prefix


def depths(model: torch.nn.Module) -> tuple[dict[str, int | None], int]:
    """Every parameter's depth (None for the head) and the number of encoder layers (see the module docstring)."""
    prefix = re.compile(rf"(?:^|\.){re.escape(_base_prefix(model))}\.(.*)$")
    pooler_is_head = bert_pooler(model) is not None
    found: dict[str, Any] = {}
    layers = 0
    for name, _ in model.named_parameters():
        inside = prefix.search(name)
        if inside is None or (pooler_is_head and inside.group(1).startswith("pooler.")):
            found[name] = None
            continue
        rest = inside.group(1)
        layer = _LAYER.search(rest)
        if layer is not None:
            found[name] = int(layer.group(1)) + 1
            layers = max(layers, int(layer.group(1)) + 1)
        elif rest.startswith("embeddings.") or ".embeddings." in rest:
            found[name] = 0
        else:
            found[name] = "top"
    return {k: (layers + 1 if v == "top" else v) for k, v in found.items()}, layers


def bert_pooler(model: torch.nn.Module) -> torch.nn.Module | None:
    """The task model's BERT-style pooler (a module that pools hidden states itself, e.g. BertPooler), or None
    (DistilBERT has none; BigBird's is a bare Linear its classification head does not read)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    return _pooler_of(getattr(inner, inner.base_model_prefix, None))


def _pooler_of(encoder: Any) -> torch.nn.Module | None:
    pooler = getattr(encoder, "pooler", None)
    inner = getattr(pooler, "original_module", pooler)  # peft wraps a module it trains and saves
    return pooler if isinstance(inner, torch.nn.Module) and type(inner).__name__.endswith("Pooler") else None


def check_freeze(freeze: Any, config: Any) -> list[str]:
    """Problems between `training.freeze` and the checkpoint (freezing more layers than it has)."""
    if not isinstance(freeze, int) or isinstance(freeze, bool):
        return []
    count = layer_count(config)
    if count is None:
        return [f"training.freeze: {freeze} layers, but the checkpoint's config does not say how many layers it has; "
                "allowed: none, embeddings or encoder"]
    if freeze > count:
        return [f"training.freeze: {freeze} layers, but the checkpoint has {count}; allowed: 1 to {count}, "
                f"embeddings, or encoder"]
    return []


@dataclass
class Trainable:
    """What trains after freezing, for the log line and the MLflow run."""

    trainable: int
    total: int
    frozen: str
    """What was frozen, for people: "nothing", "the embeddings", "the embeddings and layers 1-3", "the encoder"."""

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model: torch.nn.Module, frozen: str = "nothing") -> Trainable:
    params = list(model.parameters())
    return Trainable(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params), frozen)


def freeze(model: torch.nn.Module, what: Any, keep_trainable: frozenset[str] = frozenset()) -> Trainable:
    """Freeze the embeddings (`embeddings`), the embeddings and the first N layers (an int), or the whole encoder
    (`encoder`); `none` freezes nothing. Parameters in `keep_trainable` (ones the checkpoint did not have, freshly
    initialised) stay trainable whatever is frozen, since frozen random weights would only add noise."""
    if what in (None, "none"):
        return count_parameters(model)
    found, layers = depths(model)
    if what == "embeddings":
        top, said = 0, "the embeddings"
    elif what == "encoder":
        top, said = layers + 1, "the encoder"
    else:
        top, said = int(what), f"the embeddings and layer{'s 1-' if int(what) > 1 else ' '}{int(what)}"
    for name, param in model.named_parameters():
        depth = found[name]
        if depth is not None and depth <= top and name not in keep_trainable:
            param.requires_grad_(False)
    return count_parameters(model, said)


def encoder_frozen(model: torch.nn.Module) -> bool:
    """Whether no parameter inside the encoder trains (so its outputs can be cached)."""
    found, _ = depths(model)
    return all(not p.requires_grad for name, p in model.named_parameters() if found[name] is not None)


class FrozenFeatureCache:
    """Stands in for a frozen encoder's `forward`: the first token's final hidden state and the pooler output of each
    distinct input, computed once in eval mode and then looked up.

    For heads that read only those (`Task.head_reads_first_token`: BERT's pooler, DistilBERT's and RoBERTa's first
    token). Installed on the encoder instance, so the model's weights, state dict and saved folder are unchanged;
    `remove` restores the encoder's own forward. Inputs are keyed by their unpadded token ids (and token types).
    """

    def __init__(self, encoder: torch.nn.Module):
        self.encoder = encoder
        self.compute = encoder.forward
        # BERT's pooler is the head's (see the module docstring): it trains, so it runs on the cached states.
        self.pooler = _pooler_of(encoder)
        self.store: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.output_class: Any = None
        self.computed = 0
        encoder.forward = self  # an instance attribute: nn.Module.__call__ finds it before the class's forward

    def remove(self) -> None:
        self.encoder.__dict__.pop("forward", None)

    @staticmethod
    def _keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None) -> list[bytes]:
        keys = []
        for i in range(input_ids.shape[0]):
            keep = attention_mask[i].bool() if attention_mask is not None else slice(None)
            key = input_ids[i][keep].cpu().numpy().tobytes()
            if token_type_ids is not None:
                key += b"|" + token_type_ids[i][keep].cpu().numpy().tobytes()
            keys.append(key)
        return keys

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            return self.compute(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kwargs)
        keys = self._keys(input_ids, attention_mask, token_type_ids)
        firsts: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self.store:
                firsts.setdefault(k, i)  # a text twice in one batch is computed once
        missing = sorted(firsts.values())
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            pick = {name: t.index_select(0, rows) for name, t in
                    (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)) if t is not None}
            was_training = self.encoder.training
            self.encoder.eval()
            try:
                with torch.no_grad():
                    out = self.compute(input_ids=input_ids.index_select(0, rows), **pick, **kwargs)
            finally:
                self.encoder.train(was_training)
            self.output_class = type(out)
            # With the pooler trained as the head's, its output is computed per batch below, never stored.
            pooled = getattr(out, "pooler_output", None) if self.pooler is None else None
            for j, i in enumerate(missing):
                # Cloned: a slice would keep the whole batch's hidden states alive.
                self.store[keys[i]] = (out.last_hidden_state[j, :1].clone(), None if pooled is None else pooled[j].clone())
            self.computed += len(missing)
        first = torch.stack([self.store[k][0] for k in keys])
        pooled = [self.store[k][1] for k in keys]
        result = {"last_hidden_state": first}
        if self.pooler is not None:
            result["pooler_output"] = self.pooler(first)
        elif pooled[0] is not None:
            result["pooler_output"] = torch.stack(pooled)
        return self.output_class(**result)


def base_module(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder inside a task model (model.bert, model.distilbert, ...)."""
    return getattr(model, model.base_model_prefix)
