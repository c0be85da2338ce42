"""The task knobs a recipe sets, in one typed place.

`TaskSettings` is built once from the recipe's `task` section (which extends it with the task type and the
metric that picks the best model) and travels with every saved model in `finetune.json`, so training,
evaluation, the MLflow model and the server read the same values. Each field says which tasks use it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class TaskSettings(BaseModel):
    """The settings every task definition reads (fields a task does not use are ignored by it)."""

    # Models saved by a later version may carry knobs this one does not know: they are ignored, not refused.
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True, validate_default=True, frozen=True,
                              allow_inf_nan=False)

    threshold: float = Field(0.5, gt=0, lt=1)
    """Multi-label: sigmoid score at or above which a label is predicted. Evaluation during training applies it to the raw scores; when calibration fits a temperature T, the model is saved with the same cut on calibrated scores, sigmoid(logit(threshold) / T), so the served labels are the ones evaluation scored."""
    label_all_tokens: bool = False
    """token_classification: train on every word piece of a word (B- becomes I- after the first) instead of only the first; evaluation always scores one tag per word."""
    word_split: Literal["punctuation", "whitespace"] = "punctuation"
    """token_classification: what a word is, the same in training, evaluation and serving: punctuation (cut at whitespace, every punctuation character a word of its own, as BERT's pre-tokenizer and mostly CoNLL do; a data set's word the rule cuts, such as "U.S." or "2-1", becomes several, the first with its tag and the rest continuing it) or whitespace (cut at whitespace only: "Paris." is one word, and an entity's span includes the full stop). Served texts are cut by the same rule, so an entity's start and end are its words' characters."""
    doc_stride: int = Field(128, ge=1, le=16384)
    """question_answering: tokens shared by consecutive windows of a context longer than model.max_length."""
    max_answer_length: int = Field(30, ge=1, le=16384)
    """question_answering: longest answer, in tokens, that post-processing will pick."""
    n_best_size: int = Field(20, ge=1, le=1000)
    """question_answering: best start and end tokens per window combined into candidate answers."""
    long_inputs: Literal["truncate", "chunk"] = "truncate"
    """classification, multi_label, regression: texts longer than model.max_length are truncated, or cut into overlapping windows (chunk) that are trained on with the text's label and whose logits are pooled into one prediction per text in evaluation and serving."""
    chunk_stride: int = Field(64, ge=0, le=16384)
    """long_inputs chunk: tokens shared by consecutive windows."""
    chunk_pooling: Literal["mean", "max"] = "mean"
    """long_inputs chunk: how the windows' logits become the text's: their mean, or their element-wise max."""
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    """masked_lm: share of words (of tokens, without whole_word_mask) chosen as prediction targets; of the chosen tokens 80% become [MASK], 10% a random token and 10% stay as they are (BERT's rule). Drawn again for every batch, so each epoch masks differently; the held-out share is masked once, with a fixed seed, so its perplexity is comparable between evaluations and runs."""
    whole_word_mask: bool = True
    """masked_lm: mask every word piece of a chosen word together (words as the tokenizer's pre-tokenizer splits them: at spaces and punctuation), not single pieces."""
    pack_sequences: bool = True
    """masked_lm: concatenate texts (a [SEP] between two) and cut the stream into sequences of model.max_length tokens, so no position is padding and long-context models see full-length inputs; false: one text per sequence, a text longer than model.max_length cut into consecutive sequences."""
    class_weights: Union[Literal["balanced"], list[Annotated[float, Field(gt=0, le=1e6)]], None] = None
    """classification: the weight of each class in the cross-entropy, in label order; multi_label: the weight of each label's positive examples in its binary cross-entropy (pos_weight). balanced: from the train split's counts at training start (classification: examples / (labels x examples of the class); multi_label: negatives / positives of the label), saved with the model as numbers. null: unweighted."""
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    """classification, multi_label: cross_entropy (binary per label for multi_label), or focal: the same loss times (1 - p)^focal_gamma, p the probability given to the gold answer, so examples the model already gets right count less (Lin et al. 2017)."""
    focal_gamma: float = Field(2.0, ge=0, le=100)
    """loss focal: how much examples the model gets right are down-weighted (0: plain cross-entropy)."""
    calibration: Literal["temperature", "none"] = "temperature"
    """classification, multi_label: after training, fit temperature scaling on the evaluation split (one temperature T; scores become softmax or sigmoid of logits / T, labels never change: a multi-label threshold moves with the scores), keep T with the model and apply it wherever scores are returned; expected calibration error before and after is logged. none: raw scores."""
    temperature: float | None = Field(None, gt=0, le=1000)
    """classification, multi_label: the temperature the logits are divided by before softmax or sigmoid. Set by calibration after training; a value given here is kept and not fitted."""

    @classmethod
    def of(cls, values: Any) -> "TaskSettings":
        """The settings of a recipe's task section, a saved model's settings dict, or None (the defaults)."""
        if isinstance(values, TaskSettings) and type(values) is cls:
            return values
        if isinstance(values, BaseModel):
            values = values.model_dump()
        return cls.model_validate(values or {})

    NOT_ENCODING: ClassVar[frozenset[str]] = frozenset({
        "threshold", "temperature", "calibration", "class_weights", "loss", "focal_gamma", "label_all_tokens",
        "n_best_size", "max_answer_length", "chunk_pooling", "mlm_probability", "whole_word_mask", "pack_sequences"})
    """Settings that only train or read outputs, never change what a served input is encoded to. Everything else
    (a new field too, until it is listed here) counts as encoding (`encoding`)."""

    def encoding(self) -> dict[str, Any]:
        """The settings that decide how a served input is encoded (`Predictor.encoding_key`)."""
        return {k: v for k, v in self.saved().items() if k not in self.NOT_ENCODING}

    def saved(self) -> dict[str, Any]:
        """What goes into a model's finetune.json."""
        return TaskSettings.of(self).model_dump(mode="json")
