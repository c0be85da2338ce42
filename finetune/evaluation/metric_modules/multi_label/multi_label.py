"""finetune's multi-label metrics as a Hugging Face `evaluate` module, loaded by path (no hub).

Predictions and references are 0/1 rows, one column per label. It calls finetune.tasks.metrics, which
training and `finetune evaluate` compute with, so its numbers are theirs.
"""

import datasets
import evaluate
import numpy as np

import finetune.tasks.metrics as M


class MultiLabel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="micro and macro F1, micro precision and recall, subset accuracy, Hamming loss",
            citation="", inputs_description="predictions, references: 0/1 rows, one column per label",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Sequence(datasets.Value("int64"))}))

    def _compute(self, predictions, references):
        return M.compute_all(M.MULTI_LABEL, np.asarray(references), np.asarray(predictions))
