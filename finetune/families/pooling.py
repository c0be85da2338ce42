"""`model.pooling: mean` for heads that read the first token: the encoder's output carries the mean in its place.

Most families' sequence and multiple-choice heads read the first token's final hidden state (BERT's pooler,
RoBERTa's and ELECTRA's dense layer, DeBERTa's context pooler, DistilBERT's pre-classifier), with no setting for
anything else. Sentence-transformers bodies such as the offline MiniLM were trained for the mean over tokens. So for
`mean`, `MeanIntoFirst` stands in for the encoder's forward: it runs it, puts the attention-masked mean of the final
hidden states in the first position (and recomputes the pooler output from it), and the unchanged head reads the
mean. The choice is saved in the model's config (`finetune_pooling`), and every loader installs it again
(`install_pooling`), so training, evaluation, predict, the server, ONNX export and the frozen-feature cache all see
the same head input. Written here because transformers offers mean pooling only in the heads of the families that
have a pooling setting of their own (ModernBERT, EuroBERT), which use that setting instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from finetune.families.base import POOLING_CONFIG_KEY as CONFIG_KEY
from finetune.families.registry import family_of

__all__ = ["CONFIG_KEY", "MeanIntoFirst", "choose_pooling", "install_pooling", "masked_mean"]


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of each row's final hidden states over its real tokens (batch x hidden)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MeanIntoFirst:
    """Stands in for an encoder's `forward` (see the module docstring); `remove` restores the encoder's own."""

    def __init__(self, encoder: torch.nn.Module, family: Any):
        self.encoder = encoder
        self.compute = encoder.forward
        self.family = family
        self.signature = inspect.signature(self.compute)
        encoder.forward = self  # an instance attribute: nn.Module.__call__ finds it before the class's forward

    def remove(self) -> None:
        self.encoder.__dict__.pop("forward", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.compute(*args, **kwargs)
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        hidden = out.last_hidden_state
        mean = masked_mean(hidden, bound.get("attention_mask"))
        hidden = torch.cat([mean.unsqueeze(1), hidden[:, 1:]], dim=1)
        out["last_hidden_state"] = hidden
        # Looked up at every call: peft replaces a pooler it trains with its own wrapper after this is installed.
        pooler = self.family.pooler(self.encoder)
        if pooler is not None and out.get("pooler_output") is not None:
            out["pooler_output"] = pooler(hidden)
        return out


def choose_pooling(model: Any, pooled_head: bool, asked: str) -> Any:
    """Record on a freshly built model's config what its head reads, and install it: `asked` (`model.pooling`) when
    the family has no setting of its own for it (the family's own key was set when the model was built); `auto`
    keeps what the checkpoint says (a fine-tuned parent's choice). A head that does not read one vector per input
    (`pooled_head` False: per-token and span heads) gets none. Returns the model."""
    config = model.config
    if not pooled_head:
        config.__dict__.pop(CONFIG_KEY, None)
        return model
    wanted = family_of(config).pooling_config(config, asked).get(CONFIG_KEY)
    if wanted is not None:
        setattr(config, CONFIG_KEY, wanted)
    return install_pooling(model)


def install_pooling(model: Any) -> Any:
    """Install the pooling a model's config asks for (`finetune_pooling`); a no-op for every other model, and when it
    is installed already. Returns the model."""
    config = getattr(model, "config", None)
    if getattr(config, CONFIG_KEY, None) != "mean":
        return model
    family = family_of(config)
    encoder = family.encoder(model)
    forward = encoder.__dict__.get("forward")
    while forward is not None and not isinstance(forward, MeanIntoFirst):  # under a frozen-feature cache, say
        forward = getattr(forward, "compute", None)
    if forward is None:
        MeanIntoFirst(encoder, family)
    return model
