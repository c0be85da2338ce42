"""EuroBERT: a Llama-style encoder (rotary positions, RMSNorm, grouped-query attention with separate q/k/v
projections), a byte-level BPE tokenizer with <|begin_of_text|> and <|end_of_text|>, no token types, the input
embeddings directly in the encoder (`embed_tokens`). Its classification head pools as `classifier_pooling` says:
bos (the first token), mean, or late (the mean of every token's logits, its default). transformers has no
question-answering or multiple-choice head for it."""

from __future__ import annotations

from finetune.families.base import Family


class EuroBertFamily(Family):
    name = "eurobert"
    description = "EuroBERT"
    pooling_key = "classifier_pooling"
    pooling_values = {"first": "bos", "mean": "mean"}
    first_token_pooling = ("bos",)
    attention_dropout_key = "attention_dropout"
    lora_targets = ("q_proj", "v_proj")
    mlm_head = ("lm_head",)


EUROBERT = EuroBertFamily()
