"""DistilBERT: BERT's embeddings without token types, six layers under `transformer.layer`, no pooler (the
heads read the first token through `pre_classifier`), DistilBERT's own module names."""

from __future__ import annotations

from typing import Any

from finetune.families.base import Family


class DistilBertFamily(Family):
    name = "distilbert"
    description = "DistilBERT"
    attention_dropout_key = "attention_dropout"
    lora_targets = ("q_lin", "v_lin")
    mlm_head = ("vocab_transform",)
    bert_layout = {
        "attention.self.query": "transformer.layer.{}.attention.q_lin",
        "attention.self.key": "transformer.layer.{}.attention.k_lin",
        "attention.self.value": "transformer.layer.{}.attention.v_lin",
        "attention.output.dense": "transformer.layer.{}.attention.out_lin",
        "attention.output.LayerNorm": "transformer.layer.{}.sa_layer_norm",
        "intermediate.dense": "transformer.layer.{}.ffn.lin1",
        "output.dense": "transformer.layer.{}.ffn.lin2",
        "output.LayerNorm": "transformer.layer.{}.output_layer_norm",
    }

    def bert_sizes(self, config: Any) -> dict[str, Any]:
        return dict(hidden_size=config.dim, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
                    intermediate_size=config.hidden_dim, hidden_act=config.activation, hidden_dropout_prob=config.dropout,
                    attention_probs_dropout_prob=config.attention_dropout, layer_norm_eps=1e-12,
                    # DistilBERT has no segment embeddings; two all-zero rows add nothing, whatever ids come in.
                    type_vocab_size=2)


DISTILBERT = DistilBertFamily()
