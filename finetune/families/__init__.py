"""Model families: one module per encoder architecture, all registered here.

`finetune.families.base.Family` says what a family owns (where the embeddings and layers are, what the head reads
and how `model.pooling` is applied, positions, attention dropout, LoRA targets, the masked-LM head, dropping layers,
export). Everything that depends on the architecture asks `family_of(config or model)`; a model type no module
covers gets a generic stand-in that reads the structure from the model and offers only what it can
(`finetune.families.support` says what, and why not). Adding a family means writing its module and registering an
instance with `register_family` (here for the shipped ones, or from code that extends finetune).
"""

from __future__ import annotations

from finetune.families.base import POOLINGS, Family, Layers, encoder_of, unwrap
from finetune.families.bert import BERT
from finetune.families.big_bird import BIG_BIRD
from finetune.families.deberta_v2 import DEBERTA_V2
from finetune.families.distilbert import DISTILBERT
from finetune.families.electra import ELECTRA
from finetune.families.eurobert import EUROBERT
from finetune.families.modernbert import MODERNBERT
from finetune.families.registry import FAMILIES, family_of, register_family, unregister_family
from finetune.families.roberta import ROBERTA
from finetune.families.xlm_roberta import XLM_ROBERTA

__all__ = ["FAMILIES", "POOLINGS", "Family", "Layers", "encoder_of", "family_of", "register_family",
           "unregister_family", "unwrap"]

for _family in (BERT, DISTILBERT, BIG_BIRD, ROBERTA, XLM_ROBERTA, DEBERTA_V2, ELECTRA, MODERNBERT, EUROBERT):
    register_family(_family)
