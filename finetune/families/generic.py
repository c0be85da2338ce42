"""The stand-in family for a model type no family module covers: what can be read from the model is offered (the
layer list, the embeddings, the attention dropout under a common key), nothing is guessed. It names no LoRA targets,
knows no masked-LM head and no pooling, so `finetune validate` says which of those a recipe must give or cannot
use (`finetune.families.support`)."""

from __future__ import annotations

from typing import Any

from finetune.families.base import Family

# The keys transformers' encoders most often keep their attention dropout under.
COMMON_ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


class GenericFamily(Family):
    known = False

    def __init__(self, config: Any):
        self.name = str(getattr(config, "model_type", "unknown"))
        self.description = f"{self.name} (no family module: structure read from the model)"
        self.attention_dropout_key = next((k for k in COMMON_ATTENTION_DROPOUT_KEYS if hasattr(config, k)), None)

    def pooling_problem(self, config: Any, asked: str) -> str | None:
        if asked == "auto":
            return None
        return (f"finetune has no family module for {self.name}, so it does not know what its heads read from the "
                "encoder; allowed: auto (the head as transformers builds it)")

    def head_reads_first_token(self, config: Any) -> bool:
        return False  # unknown: a frozen encoder's outputs are cached for every position, which fits any head
