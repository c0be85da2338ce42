"""RoBERTa: BERT's layers with a byte-level BPE tokenizer, one token type, and positions counted from
padding_idx + 1 (so a 514-position checkpoint reads at most 512 tokens); its classification head reads the first
token itself, the multiple-choice head the pooler."""

from __future__ import annotations

from typing import Any

from finetune.families.base import Family


class RobertaFamily(Family):
    name = "roberta"
    description = "RoBERTa and checkpoints of its architecture"
    head_pooler = "pooler"
    lora_targets = ("query", "value")
    mlm_head = ("lm_head",)

    def position_offset(self, config: Any) -> int:
        # RobertaEmbeddings numbers real tokens from padding_idx + 1 (create_position_ids_from_input_ids).
        pad = getattr(config, "pad_token_id", None)
        return pad + 1 if isinstance(pad, int) else 2

    def new_pooler(self, config: Any) -> Any:
        from transformers.models.roberta.modeling_roberta import RobertaPooler

        return RobertaPooler(config)


ROBERTA = RobertaFamily()
