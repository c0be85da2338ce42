"""finetune's extractive QA metrics (SQuAD v1.1 exact match and F1) as a Hugging Face `evaluate` module, loaded
by path (no hub).

Inputs are in the `squad` metric's form: predictions {id, prediction_text}, references {id, answers: {text,
answer_start}}. It calls finetune.tasks.metrics, which training and `finetune evaluate` compute with, so its
numbers are theirs.
"""

import datasets
import evaluate

import finetune.tasks.metrics as M


class QuestionAnswering(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD v1.1 exact match and F1 (0-100), best over each question's gold answers",
            citation="", inputs_description="predictions {id, prediction_text}; references {id, answers: {text, answer_start}}",
            features=datasets.Features({
                "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                "references": {"id": datasets.Value("string"), "answers": datasets.Sequence(
                    {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")})},
            }))

    def _compute(self, predictions, references):
        answers = {r["id"]: list(r["answers"]["text"]) for r in references}
        return M.squad_scores([p["prediction_text"] for p in predictions], [answers[p["id"]] for p in predictions])
