"""ModernBERT (and the Ettin encoders): rotary positions, alternating global and sliding-window attention
(`layer_types`), fused query-key-value projections, a byte-level BPE tokenizer without token types. Its heads pool
as `classifier_pooling` says (cls or mean) through a dense + norm `head` that the masked-LM model has too."""

from __future__ import annotations

from typing import Any

from finetune.families.base import Family


class ModernBertFamily(Family):
    name = "modernbert"
    description = "ModernBERT and Ettin encoders"
    pooling_key = "classifier_pooling"
    pooling_values = {"first": "cls", "mean": "mean"}
    first_token_pooling = ("cls",)
    attention_dropout_key = "attention_dropout"
    # The query, key and value projections are one fused layer (peft has no default for ModernBERT).
    lora_targets = ("Wqkv",)
    mlm_head = ("head",)
    mlm_head_shared = ("head.",)

    def layer_selection_problem(self, layers: list[int], config: Any) -> str | None:
        if layers[0] != 0:
            return ("ModernBERT's first layer has no attention LayerNorm (the embeddings' norm stands in for it), so "
                    "a smaller ModernBERT must start with layer 0; e.g. --layers 0," +
                    ",".join(str(n) for n in layers if n != 0))
        return None


MODERNBERT = ModernBertFamily()
