"""finetune's regression metrics as a Hugging Face `evaluate` module, loaded by path (no hub).

Predictions and references are numbers. It calls finetune.tasks.metrics, which training and `finetune
evaluate` compute with, so its numbers are theirs.
"""

import datasets
import evaluate
import numpy as np

import finetune.tasks.metrics as M


class Regression(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Pearson and Spearman correlation, mean squared and absolute error, R^2",
            citation="", inputs_description="predictions, references: numbers",
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}))

    def _compute(self, predictions, references):
        return M.compute_all(M.REGRESSION, np.asarray(references, dtype=np.float64),
                             np.asarray(predictions, dtype=np.float64))
