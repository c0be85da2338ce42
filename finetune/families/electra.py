"""ELECTRA: BERT's layers behind a projection from a smaller embedding size (`embeddings_project`, part of the
embeddings); its masked-LM model is the generator, its classification head reads the first token."""

from __future__ import annotations

from finetune.families.base import Family


class ElectraFamily(Family):
    name = "electra"
    description = "ELECTRA discriminators and generators"
    extra_embeddings = ("embeddings_project",)
    lora_targets = ("query", "value")
    mlm_head = ("generator_predictions",)


ELECTRA = ElectraFamily()
