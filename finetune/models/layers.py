"""What trains: the encoder's layers by depth, freezing them (`training.freeze`), and caching a frozen encoder.

Depth is read from the model's structure as its family (`finetune.families`) finds it, so it works for every
family (and for LoRA parameters inside the layers): the embeddings (with what the family adds to them, such as
ELECTRA's projection and DeBERTa's relative positions) are depth 0, encoder layer i is depth i + 1, anything else
inside the encoder (a final norm, BigBird's pooler) sits on top at depth L + 1, and parameters outside the encoder
are the task head (depth None). Layer-wise learning-rate decay (`finetune.training.optim`) reads the same depths.

A pooler inside the encoder that the head reads (BERT's and RoBERTa's dense + tanh on the first token, read by the
sequence-classification and multiple-choice heads) counts as the head, as DistilBERT's pre_classifier does: it trains whatever is frozen, and an adapter saves
it with the head. Frozen, the offline MiniLM's pooler (which sentence-transformers never trained) hands the
classifier outputs of about 0.05, and a linear probe and LoRA r=8 both stayed at the majority class (0.509) on
SST-2 while full fine-tuning reached 0.78 (bench/transfer.py).

With the whole encoder frozen, its output for a text never changes, so `FrozenFeatureCache` computes it once per
distinct input (in eval mode, without dropout) and afterwards hands the head the stored vectors: a linear probe
then costs one encoder pass per text instead of one per text per epoch, and no backward pass through the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.families import family_of, unwrap

_HEAD = object()  # marks parameters inside the encoder that belong to the head (BERT's pooler)


def layer_count(config: Any) -> int | None:
    """How many transformer layers a checkpoint's encoder has (None: the config does not say)."""
    return family_of(config).layer_count(config)


def depths(model: torch.nn.Module) -> tuple[dict[str, int | None], int]:
    """Every parameter's depth (None for the head) and the number of encoder layers (see the module docstring).

    Read from the model's structure through its family (`finetune.families`): the modules of the embeddings, the
    layer list, the pooler the head reads; never from parameter names.
    """
    inner = unwrap(model)
    family = family_of(inner.config)
    encoder = family.encoder(inner)
    found = family.layers(encoder, inner.config)
    by_parameter: dict[int, Any] = {}
    for _, module in family.embeddings(encoder):
        for param in module.parameters():
            by_parameter[id(param)] = 0
    count = 0 if found is None else len(found.modules)
    for i, layer in enumerate(found.modules if found is not None else ()):
        for param in layer.parameters():
            by_parameter[id(param)] = i + 1
    pooler = head_pooler(model)
    for param in (pooler.parameters() if pooler is not None else ()):
        by_parameter[id(param)] = _HEAD
    for param in encoder.parameters():
        by_parameter.setdefault(id(param), count + 1)  # inside the encoder, above the layers (a final norm)
    depth = {name: by_parameter.get(id(param)) for name, param in model.named_parameters()}
    return {name: None if d is _HEAD else d for name, d in depth.items()}, count


def head_pooler(model: torch.nn.Module) -> torch.nn.Module | None:
    """The pooler inside the encoder that the task head reads and trains as its own (BERT's, RoBERTa's), or None."""
    inner = unwrap(model)
    family = family_of(inner.config)
    if family.head_pooler is None:
        return None
    pooler = getattr(family.encoder(inner), family.head_pooler, None)
    return pooler if isinstance(pooler, torch.nn.Module) else None


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
    """Stands in for a frozen encoder's `forward`: what the head reads of each distinct input, computed once in eval
    mode and then looked up.

    With `first_only` (heads that read one vector per input from the first position, `Family.head_reads_first_token`:
    BERT's pooler, DistilBERT's and RoBERTa's first token, the mean `model.pooling` puts there) it keeps the first
    position's final hidden state and the pooler output; otherwise (ModernBERT's mean pooling, EuroBERT's late
    pooling, per-token heads) the final hidden state of every real token, put back in place for each batch.
    Installed on the encoder instance, so the model's weights, state dict and saved folder are unchanged; `remove`
    restores the encoder's own forward. Inputs are keyed by their unpadded token ids (and token types).
    """

    def __init__(self, encoder: torch.nn.Module, first_only: bool = True):
        self.encoder = encoder
        self.compute = encoder.forward
        self.first_only = first_only
        # A pooler the head trains (BERT's, see the module docstring) runs on the cached states at every batch.
        pooler = getattr(encoder, family_of(encoder.config).head_pooler or "", None)
        self.pooler = pooler if isinstance(pooler, torch.nn.Module) else None
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
        given = {name: t for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids))
                 if t is not None}  # only what the caller passed: not every family's encoder takes token types
        if input_ids is None or kwargs.get("inputs_embeds") is not None or kwargs.get("output_hidden_states"):
            # Every layer's states (distillation's hidden term) are not kept: computed as usual.
            return self.compute(input_ids=input_ids, **given, **kwargs)
        keys = self._keys(input_ids, attention_mask, token_type_ids)
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        firsts: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self.store:
                firsts.setdefault(k, i)  # a text twice in one batch is computed once
        missing = sorted(firsts.values())
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            pick = {name: t.index_select(0, rows) for name, t in given.items()}
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
                states = out.last_hidden_state[j, :1] if self.first_only else out.last_hidden_state[j][real[i]]
                self.store[keys[i]] = (states.clone(), None if pooled is None else pooled[j].clone())
            self.computed += len(missing)
        if self.first_only:
            hidden = torch.stack([self.store[k][0] for k in keys])
        else:
            first = self.store[keys[0]][0]
            hidden = first.new_zeros((len(keys), input_ids.shape[1], first.shape[-1]))
            for i, k in enumerate(keys):
                hidden[i][real[i]] = self.store[k][0]
        pooled = [self.store[k][1] for k in keys]
        result = {"last_hidden_state": hidden}
        if self.pooler is not None:
            result["pooler_output"] = self.pooler(hidden)
        elif pooled[0] is not None:
            result["pooler_output"] = torch.stack(pooled)
        return self.output_class(**result)


def base_module(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder inside a task model (model.bert, model.distilbert, model.model, ...)."""
    return family_of(unwrap(model).config).encoder(model)
