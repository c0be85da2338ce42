"""finetune's classification metrics as a Hugging Face `evaluate` module, loaded by path (no hub):

    evaluate.load(".../finetune/evaluation/metric_modules/classification").compute(predictions=ids, references=ids)

Predictions and references are class ids. It calls finetune.tasks.metrics, which training and `finetune
evaluate` compute with, so its numbers are theirs.
"""

import datasets
import evaluate
import numpy as np

import finetune.tasks.metrics as M


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="accuracy, macro and weighted F1, macro precision and recall, Matthews correlation",
            citation="", inputs_description="predictions, references: class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return M.compute_all(M.CLASSIFICATION, np.asarray(references), np.asarray(predictions))
