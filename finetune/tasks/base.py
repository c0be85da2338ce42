"""What a task definition is: the interface every task implements, and the types that cross it.

A task says, in one class: which recipe fields it needs, how label values become label ids, how rows
become model features, which head it puts on the encoder, **its loss** (computed here from the model's
outputs, never by the head), which metrics apply, what files evaluation writes for a person, how inputs
look on the command line and over HTTP, and how outputs become answers. Training, evaluation, `finetune
validate`, the MLflow model and the server all go through it, so they cannot drift apart, and a new task
is one module registered in `finetune.tasks`.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from finetune.errors import InputError
import finetune.tasks.metrics as M
from finetune.tasks.settings import TaskSettings

IGNORE_INDEX = -100
"""Label id left out of the loss (padding, continuation word pieces), as in the Hugging Face heads."""

__all__ = ["IGNORE_INDEX", "Encoded", "FeatureContext", "InputError", "LabelEncoding", "PostprocessOptions",
           "Reference", "Task", "TaskSettings", "nfc", "nfc_all", "nfc_spans", "softmax", "sigmoid"]


# --- the one text normalisation every path from text to prediction applies -------------------------------------
# Text reaches the tokenizer in Unicode NFC wherever it comes from: training and evaluation rows, `predict`
# arguments, scored files, HTTP requests, the ONNX path (all of them tokenise through the task's functions). macOS
# and some editors write Hangul (and accented Latin) decomposed, NFD: "한" as the three jamo ᄒ ᅡ ᆫ. Byte-level BPE
# families (RoBERTa, ModernBERT) have no normaliser, so the same word would become other pieces; BERT's uncased
# normaliser decomposes everything anyway, where NFC changes nothing. Hand-written (unicodedata) rather than a
# `tokenizers` normaliser on the tokenizer, so saved tokenizers and models made before stay as they are.


def nfc(text: str) -> str:
    """`text` in Unicode NFC (composed), the form every text is tokenised in."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def nfc_all(texts: Sequence[str]) -> list[str]:
    """Every text of a batch in NFC (see `nfc`)."""
    return [nfc(t) for t in texts]


def _starts_cluster(ch: str) -> bool:
    # A character composition never merges into what comes before it: not a combining mark, and not a Hangul
    # medial vowel or final consonant jamo, which compose with the jamo before them although their combining class
    # is 0.
    return unicodedata.combining(ch) == 0 and not ("\u1161" <= ch <= "\u1175" or "\u11a8" <= ch <= "\u11c2")


def nfc_spans(text: str) -> tuple[str, list[tuple[int, int]] | None]:
    """`text` in NFC and, per character of the result, the span of `text` it came from (None when `text` is
    already NFC, so offsets need no mapping). Offsets into the normalised text map back with it, so answers and
    entities are reported at their places in the text as it was given."""
    if unicodedata.is_normalized("NFC", text):
        return text, None
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    start = 0
    for end in range(1, len(text) + 1):
        if end == len(text) or _starts_cluster(text[end]):
            piece = unicodedata.normalize("NFC", text[start:end])
            out.append(piece)
            spans += [(start, end)] * len(piece)
            start = end
    normalised = "".join(out)
    if normalised != unicodedata.normalize("NFC", text):  # a composition across clusters this rule did not foresee
        normalised = unicodedata.normalize("NFC", text)
        spans = [(0, len(text))] * len(normalised)  # no finer map: a span then covers the whole text
    return normalised, spans


def original_span(spans: list[tuple[int, int]] | None, start: int, end: int) -> tuple[int, int]:
    """Character offsets [start, end) into an `nfc_spans` result, as offsets into the text it was made from."""
    if spans is None or end <= start:
        return start, end
    return spans[start][0], spans[end - 1][1]


@dataclass
class Encoded:
    """Request inputs turned into model features.

    One input can give several features (QA windows over a long context), so each feature says
    which input it belongs to (`owner`) and carries what post-processing needs (`meta`: offsets).
    """

    features: list[dict[str, Any]]
    owner: list[int]
    meta: list[Any]
    truncated: list[bool]
    """Per input: whether part of it was cut off to fit the model's length."""


@dataclass
class FeatureContext:
    """What turning labelled rows into model features needs besides the rows themselves."""

    data: Any  # the recipe's DataSection
    tokenizer: Any
    max_length: int
    settings: TaskSettings
    label_names: Sequence[str] | None
    train: bool
    """Training features (QA: answer positions only) or evaluation ones (QA: also offsets and example ids)."""


@dataclass
class Reference:
    """An evaluation split as post-processing needs it: its features (with eval-only columns) and raw rows."""

    features: Any
    raw: Any
    data: Any  # the recipe's DataSection: which raw columns hold what


@dataclass
class LabelEncoding:
    """A label column turned into what the task's loss reads, and the values that could not be."""

    labels: list[Any]
    bad: list[Any]
    feature: Any
    """The `datasets` feature of the new `labels` column."""
    allowed: str
    """What a label value may be, for the error message when `bad` is not empty."""


@dataclass(frozen=True)
class PostprocessOptions:
    """Per-request knobs for turning outputs into answers."""

    threshold: float = 0.5
    """Multi-label: a label is predicted when its sigmoid score is at least this."""
    top_k: int | None = None
    """Classification: also return the k best labels with scores."""


def class_weights_length(weights: Sequence[float], label_names: Sequence[str]) -> str:
    shown = ", ".join(label_names[:10]) + (", ..." if len(label_names) > 10 else "")
    return (f"task.class_weights: {len(weights)} weights for {len(label_names)} labels ({shown}); give one per label "
            f"in that order, or balanced")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


class Task:
    """The interface of a task definition; subclasses set the class attributes and implement the methods.

    Methods with a body here are shared defaults; the ones that raise NotImplementedError every task writes.
    """

    name: str = ""
    description: str = ""
    metrics: dict[str, M.Metric] = {}
    default_metric: str = ""
    has_label_names: bool = True
    """False for tasks that predict a number or a position (regression, QA, multiple choice): no label set."""
    auto_model: str = "AutoModelForSequenceClassification"
    """The transformers Auto class that puts this task's head on an encoder."""
    hf_problem_type: str | None = None
    """Saved as `config.problem_type` so transformers' own pipelines (the MLflow transformers flavour) read the
    logits the way this task does (softmax or sigmoid); the loss is always the task's own (`loss`)."""
    pipeline_task: str | None = None
    """The transformers pipeline task of the MLflow transformers flavour (None: pyfunc only)."""
    target_keys: tuple[str, ...] = ("labels",)
    """Batch keys the loss reads as targets; they are never passed to the model."""
    keep_raw_columns: frozenset = frozenset({"labels"})
    """Columns of the labelled split that survive tokenisation (the rest is replaced by features)."""
    eval_only_columns: tuple[str, ...] = ("example_id",)
    """Feature columns evaluation needs for post-processing but the model must not receive."""
    per_token: bool = False
    """Whether a feature's output has one row per token (so it is trimmed to the feature's length)."""
    structured_inputs: bool = False
    """Inputs are JSON objects (QA: question and context), not texts: on the CLI each argument is parsed as JSON."""
    onnx_export: bool = False
    """Whether `finetune export` can make and check an ONNX Runtime copy of models of this task."""
    stratify: bool = False
    """Whether an evaluation split carved from train keeps the label proportions."""
    reads_text_pair: bool = True
    """Whether `data.text_pair_column` means something to this task."""
    reads_choice_columns: bool = False
    """Whether `data.choice_columns` means something to this task."""
    reads_chunks: bool = False
    """Whether the task can read long texts in windows (`task.long_inputs: chunk`)."""
    serves: bool = True
    """Whether its models answer inputs (`finetune predict`, `serve`, `export`, the logged MLflow model). False for
    tasks whose output is a checkpoint to fine-tune (masked_lm): those are refused with `not_served`."""
    feature_settings: tuple[str, ...] = ()
    """Task settings, beyond the ones every task's features depend on, that change this task's features (part of
    the tokenisation cache key)."""
    weighted_losses: bool = False
    """Whether `task.class_weights` and `task.loss: focal` mean something to this task (classification, multi_label)."""
    calibrates: bool = False
    """Whether scores are softmax or sigmoid of logits that temperature scaling (`task.calibration`) can calibrate."""
    sigmoid_scores: bool = False
    """Whether each output is a probability of its own (a sigmoid per label) rather than a softmax over outputs."""
    pooled_head: bool = False
    """Whether the head reads one vector per input made from the encoder's output (the first token, or what
    `model.pooling` makes: sequence tasks and multiple choice), so `model.pooling` applies and a frozen encoder's
    outputs can be cached as one vector per input (`training.freeze: encoder`)."""
    ranks_label_issues: bool = False
    """Whether the model gives a probability per class (`label_probabilities`), so `finetune evaluate
    --find-label-issues` and `finetune label-issues` can rank the examples whose label it disputes."""

    # --- recipe ------------------------------------------------------------------------------
    def check_recipe(self, recipe: Any) -> list[str]:
        """Problems with the task-specific fields of a recipe, one message each (empty: none)."""
        problems = []
        if recipe.data.text_pair_column and not self.reads_text_pair:
            problems.append(f"data.text_pair_column is not used by task.type {self.name}")
        if recipe.data.choice_columns and not self.reads_choice_columns:
            problems.append(f"data.choice_columns is not used by task.type {self.name}")
        if recipe.task.long_inputs == "chunk" and not self.reads_chunks:
            from finetune.tasks.registry import TASKS

            able = [name for name, task in TASKS.items() if task.reads_chunks]
            problems.append(f"task.long_inputs: chunk is for {', '.join(able[:-1])} and {able[-1]}, not {self.name}")
        settings = recipe.task
        if not self.weighted_losses and (settings.class_weights is not None or settings.loss != "cross_entropy"):
            key = "task.class_weights" if settings.class_weights is not None else "task.loss: focal"
            problems.append(f"{key} is for classification and multi_label, not {self.name}; remove it")
        if not self.calibrates and settings.temperature is not None:
            problems.append(f"task.temperature is for classification and multi_label, not {self.name}; remove it")
        names = recipe.data.label_names
        if isinstance(settings.class_weights, list) and names is not None and len(settings.class_weights) != len(names):
            problems.append(class_weights_length(settings.class_weights, names))
        return problems

    def settings_for_training(self, settings: TaskSettings, train: Any, label_names: Sequence[str] | None) -> TaskSettings:
        """The settings training and evaluation use, with what depends on the train split resolved to numbers
        (`class_weights: balanced`); raises RecipeError when they do not fit the label set."""
        return settings

    def skew_warning(self, train: Any, label_names: Sequence[str] | None, settings: TaskSettings) -> str | None:
        """For `finetune validate`: a warning naming the knob that helps when the train labels are skewed."""
        return None

    def greater_is_better(self, metric: str) -> bool:
        return self.metrics[metric].greater_is_better

    # --- data ------------------------------------------------------------------------------
    def columns(self, data: Any) -> dict[str, str]:
        """Recipe key -> column name of every column this task reads."""
        wanted = {"data.text_column": data.text_column, "data.label_column": data.label_column}
        if data.text_pair_column:
            wanted["data.text_pair_column"] = data.text_pair_column
        return wanted

    def label_names_from(self, values: Sequence[Any], data: Any) -> list[str] | None:
        """The label set, in id order, from the train split's label column (when neither the recipe nor a
        ClassLabel feature names it). Raises ValueError with a message when the column cannot give one."""
        return None

    def encode_labels(self, values: Sequence[Any], label_names: Sequence[str] | None, by_position: bool,
                      data: Any) -> LabelEncoding | None:
        """The label column as the loss reads it (None: the labels are read while tokenising, as QA's answers)."""
        raise NotImplementedError

    def features(self, batch: dict[str, list], indices: list[int], ctx: FeatureContext) -> dict:
        """Model features for a batch of labelled rows (a `datasets.map(batched=True, with_indices=True)` function)."""
        raise NotImplementedError

    def token_lengths(self, batch: dict[str, list], data: Any, tokenizer: Any, settings: TaskSettings) -> list[int]:
        """Untruncated token counts of a batch of rows (tokenised with the recipe's task settings), for
        `finetune validate`."""
        raise NotImplementedError

    def window_stats(self, rows: dict[str, list], lengths: np.ndarray, data: Any, tokenizer: Any, max_length: int,
                     settings: TaskSettings) -> dict[str, Any] | None:
        """For tasks that read long inputs in windows: the share of inputs needing more than one and the most
        any needs (`multi_window_share`, `windows_max`, `unit`); None for tasks that truncate."""
        return None

    def label_counts(self, split: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
        """How many examples of a labelled split carry each label (or what describes its targets)."""
        raise NotImplementedError

    def collator(self, tokenizer: Any, pad_to_multiple_of: int | None, settings: TaskSettings | None = None) -> Any:
        """The function that turns a list of features into a padded batch (masked_lm: also masks it)."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    # --- model and loss ----------------------------------------------------------------------
    def num_labels(self, label_names: Sequence[str] | None) -> int | None:
        """Outputs of the head (None: the head's size is fixed by its architecture)."""
        return len(label_names) if label_names is not None else None

    def model_loaded(self, model: Any, loading_info: dict[str, Any], checkpoint: str, path: Path) -> None:
        """Called once the task's head is on the pretrained encoder (`checkpoint` as the recipe names it, `path` its
        folder), with transformers' loading report (missing and unexpected weights): a task can finish setting up
        its head here (masked_lm ties a new one)."""

    def not_served(self, where: str) -> str:
        """Why a model of a task that does not serve (`serves` False) cannot answer, and what to do instead."""
        return f"{where} is a {self.name} model, which does not answer inputs"

    def forward(self, model: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        """The model's outputs on a batch, for `loss` and `eval_tensors`. A task may compute only what its loss
        reads (masked_lm: the vocabulary at the masked positions only)."""
        return model(**inputs)

    def loss(self, outputs: Any, targets: dict[str, Any], settings: TaskSettings) -> Any:
        """The training loss of a batch from the model's outputs and the batch's targets (`target_keys`)."""
        raise NotImplementedError

    def split_batch(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A collated batch as (model inputs, loss targets): the targets never reach the model, so no head
        computes a loss of its own."""
        inputs = {k: v for k, v in batch.items() if k not in self.target_keys}
        return inputs, {k: batch[k] for k in self.target_keys if k in batch}

    # --- evaluation ----------------------------------------------------------------------
    def eval_tensors(self, outputs: Any, batch: dict) -> dict:
        """What evaluation gathers from every batch (across processes)."""
        return {"logits": outputs.logits, "labels": batch["labels"]}

    def evaluation(self, collected: dict[str, list[np.ndarray]], reference: Reference, settings: TaskSettings,
                   label_names: Sequence[str] | None) -> tuple[dict[str, float], Any]:
        """Metrics from everything gathered over a split, and the outputs the artifacts are made from."""
        raise NotImplementedError

    def evaluation_warnings(self, reference: Reference, outputs: Any, label_names: Sequence[str] | None,
                            settings: TaskSettings) -> list[str]:
        """What a person should be warned of in an evaluation's outputs (e.g. one class predicted for every
        example), one message each with its likely causes; shown in the run's summary and logged as the MLflow
        tag `finetune.warnings`. None by default."""
        return []

    def write_artifacts(self, out_dir: Path, reference: Reference, outputs: Any, metrics: dict[str, float],
                        label_names: Sequence[str] | None, settings: TaskSettings) -> list[Path]:
        """The evaluation files a person reads (predictions.csv mistakes first, per-class tables, plots)."""
        raise NotImplementedError

    def collect(self, rows: Sequence[np.ndarray], features: Sequence[dict[str, Any]]) -> dict[str, list]:
        """What `evaluation` reads, from a loaded model's output (`output_array`) for every feature of a labelled
        split, in feature order: the arrays `eval_tensors` gathers in the training loop, for evaluating a model
        outside it (`finetune evaluate`, which may run on ONNX Runtime, where there are no model outputs to gather)."""
        return {"logits": [np.stack(list(rows))], "labels": [np.asarray([f["labels"] for f in features])]}

    def metric_inputs(self, outputs: Any, reference: Reference, settings: TaskSettings) -> dict[str, list]:
        """An evaluation's predictions and gold values (`predictions`, `references`) as Hugging Face `evaluate`
        metrics of this kind read them: class ids, 0/1 rows, numbers, tag lists, SQuAD dicts. The packaged
        `evaluate` modules (finetune/evaluation/metric_modules) read the same and give `evaluation`'s numbers."""
        raise NotImplementedError

    def label_probabilities(self, outputs: Any, settings: TaskSettings) -> np.ndarray | None:
        """Per example, the model's probability of every label (None for tasks without a label set); what the
        label-issue ranking reads (see `ranks_label_issues`)."""
        return None

    # --- inputs and answers ----------------------------------------------------------------
    def parse_inputs(self, inputs: Sequence[Any], text_pair: bool) -> list[Any]:
        """Check request inputs, raising `InputError` naming the first bad one."""
        raise NotImplementedError

    def encode(self, tokenizer: Any, inputs: list[Any], text_pair: bool, max_length: int,
               settings: TaskSettings) -> Encoded:
        """Features for checked inputs, truncated to max_length, with which inputs were truncated."""
        raise NotImplementedError

    def output_array(self, outputs: Any) -> Any:
        """The one tensor a forward pass answers with (batch first)."""
        return outputs.logits

    def answer(self, inputs: list[Any], encoded: Encoded, rows: Sequence[np.ndarray], label_names: Sequence[str] | None,
               settings: TaskSettings, options: PostprocessOptions) -> list[dict[str, Any]]:
        """One JSON-ready answer per input from the outputs of its features."""
        raise NotImplementedError

    def example_input(self, text_pair: bool) -> Any:
        """A valid input, for warm-up and the MLflow signature."""
        return ["The first sentence.", "The second sentence."] if text_pair else "a gripping, beautiful film"

    def inputs_from_cli(self, arguments: Sequence[str], text_pair: bool) -> list[Any]:
        """`finetune predict MODEL ARG ...`: the inputs the arguments stand for (raises InputError)."""
        if self.structured_inputs:
            inputs = []
            for i, text in enumerate(arguments):
                try:
                    inputs.append(json.loads(text))
                except json.JSONDecodeError as e:
                    example = json.dumps(self.example_input(text_pair))
                    raise InputError(i, f"this model reads JSON objects such as '{example}': {e}") from None
            return inputs
        if text_pair:
            if len(arguments) % 2:
                raise InputError(len(arguments) - 1, "this model reads sentence pairs: give texts two by two "
                                                     f"(got {len(arguments)})")
            return [[arguments[i], arguments[i + 1]] for i in range(0, len(arguments), 2)]
        return list(arguments)

    def input_columns(self, data: Any, text_pair: bool) -> dict[str, str | None]:
        """Recipe key -> column of every column `inputs_from_rows` reads (None: needed but not named)."""
        wanted = {"data.text_column": data.text_column}
        if text_pair:
            wanted["data.text_pair_column"] = data.text_pair_column
        return wanted

    def inputs_from_rows(self, columns: dict[str, list], data: Any, text_pair: bool) -> list[Any]:
        """`finetune predict --input FILE`: the model input of every row of a table (columns by name, named as
        in a recipe's data section: `data.text_column`, ...), in the form `parse_inputs` checks."""
        texts = [_cell_text(v) for v in columns[data.text_column]]
        if not text_pair:
            return texts
        return [[a, _cell_text(b)] for a, b in zip(texts, columns[data.text_pair_column])]

    def format_answer(self, item: Any, answer: dict[str, Any]) -> str:
        """One terminal line for an answer (`finetune predict` without --json)."""
        return f"{json.dumps(answer, ensure_ascii=False)}\t{item}"


def _cell_text(value: Any) -> str:
    """A table cell as text: missing cells are empty (and refused as inputs), word lists are joined."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)
