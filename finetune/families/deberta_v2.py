"""DeBERTa-v2 and -v3: disentangled attention over relative positions. The relative position embeddings and their
LayerNorm sit inside the encoder but serve every layer, so they count as embeddings; with
`position_biased_input: false` (v3) there are no absolute positions to limit the input length."""

from __future__ import annotations

from typing import Any

from finetune.families.base import Family


class DebertaV2Family(Family):
    name = "deberta-v2"
    description = "DeBERTa-v2 and DeBERTa-v3"
    extra_embeddings = ("encoder.rel_embeddings", "encoder.LayerNorm")
    lora_targets = ("query_proj", "value_proj")
    # transformers builds the legacy BERT-style head (`cls`) or, with `legacy: false`, `lm_predictions`.
    mlm_head = ("cls", "lm_predictions")

    def usable_positions(self, config: Any) -> int | None:
        if not getattr(config, "position_biased_input", True):
            return None
        return super().usable_positions(config)


DEBERTA_V2 = DebertaV2Family()
