"""XLM-RoBERTa: RoBERTa's architecture with a SentencePiece Unigram vocabulary of 250,000 pieces (100 languages)."""

from __future__ import annotations

from finetune.families.roberta import RobertaFamily


class XlmRobertaFamily(RobertaFamily):
    name = "xlm-roberta"
    description = "XLM-RoBERTa (multilingual RoBERTa)"


XLM_ROBERTA = XlmRobertaFamily()
