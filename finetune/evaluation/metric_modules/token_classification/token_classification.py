"""finetune's NER metrics as a Hugging Face `evaluate` module, loaded by path (no hub).

Predictions and references are IOB2 tag lists, one tag per word (seqeval's form); scores are entity-level,
strict IOB2, overall and per entity type. It calls finetune.tasks.metrics, which training and `finetune
evaluate` compute with, so its numbers are theirs.
"""

import datasets
import evaluate

import finetune.tasks.metrics as M


class TokenClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="entity-level precision, recall and F1 (seqeval, strict IOB2), per entity type, token accuracy",
            citation="", inputs_description="predictions, references: lists of IOB2 tags, one per word",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references):
        return M.entity_scores([list(r) for r in references], [list(p) for p in predictions])
