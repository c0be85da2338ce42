"""finetune's multiple-choice metric (accuracy) as a Hugging Face `evaluate` module, loaded by path (no hub).

Predictions and references are choice indices. It calls finetune.tasks.metrics, which training and
`finetune evaluate` compute with, so its numbers are theirs.
"""

import datasets
import evaluate
import numpy as np

import finetune.tasks.metrics as M


class MultipleChoice(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="accuracy: the share of examples whose chosen index is the correct one",
            citation="", inputs_description="predictions, references: choice indices",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return {"accuracy": M.accuracy(np.asarray(references), np.asarray(predictions))}
