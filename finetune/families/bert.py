"""BERT (and the checkpoints built like it: MiniLM, the sentence-transformers bodies): WordPiece, token types,
learned absolute positions, a pooler (dense + tanh on [CLS]) that the sequence and multiple-choice heads read."""

from __future__ import annotations

from typing import Any

from finetune.families.base import Family

# BERT's own layer weight names: the layout `finetune convert --to bigbird` maps other families onto.
BERT_LAYER_NAMES = (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm",
)


class BertFamily(Family):
    name = "bert"
    description = "BERT, MiniLM and other BERT-architecture checkpoints"
    head_pooler = "pooler"
    lora_targets = ("query", "value")
    mlm_head = ("cls",)
    bert_layout = {name: f"encoder.layer.{{}}.{name}" for name in BERT_LAYER_NAMES}

    def bert_sizes(self, config: Any) -> dict[str, Any]:
        """The architecture in BERT's (and BigBird's) config terms, for `convert --to bigbird`."""
        return dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                    num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                    hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout_prob,
                    attention_probs_dropout_prob=config.attention_probs_dropout_prob,
                    layer_norm_eps=config.layer_norm_eps, type_vocab_size=config.type_vocab_size)

    def new_pooler(self, config: Any) -> Any:
        """An empty pooler of this family, to carry a checkpoint's trained one through masked-LM pretraining (the
        masked-LM model is built without it)."""
        from transformers.models.bert.modeling_bert import BertPooler

        return BertPooler(config)


BERT = BertFamily()
