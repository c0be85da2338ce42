"""Recipes: the typed, validated description of one fine-tuning run.

A recipe is YAML data (read with `yaml.safe_load`, never executed). It may extend other recipes
with `defaults: [base.yaml]` (merged deeply, later files win) and be changed from the command
line with dotted `key=value` overrides, each parsed to the type the schema gives that key.
Every field is documented by the docstring under it; `finetune fields` prints them.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_serializer, model_validator

from finetune.errors import RecipeError
from finetune.tasks import TASKS, TaskSettings

__all__ = ["Recipe", "RecipeError", "ModelSection", "DataSection", "TaskSection", "TrainingSection",
           "TrackingSection", "load_recipe", "parse_override", "recipe_to_yaml", "flatten", "describe_fields"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class ModelSection(_Section):
    checkpoint: str
    """Pretrained checkpoint: a Hugging Face hub id (e.g. bert-base-uncased) or a local directory saved with save_pretrained."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the checkpoint; ignored for local directories."""
    max_length: int = Field(128, ge=8, le=16384)
    """Longest input in tokens; longer inputs are truncated (validate reports how many)."""
    attention_type: Literal["block_sparse", "original_full"] | None = None
    """BigBird only, and required there: block_sparse or original_full attention. Never switched silently."""
    block_size: int | None = Field(None, ge=1)
    """BigBird only: block size of sparse attention (default: the checkpoint's). Inputs are padded to a multiple of it."""
    num_random_blocks: int | None = Field(None, ge=0)
    """BigBird only: random blocks each query block attends to (default: the checkpoint's)."""
    sparse_attention_min_length: int | None = Field(None, ge=1)
    """BigBird block_sparse only: a batch runs block-sparse attention when its padded length is at least this many tokens, full attention otherwise (chosen per batch, restored after it; the same rule in training, evaluation and serving). Default: (6 + 2 x num_random_blocks) x block_size, the shortest padded length above the (5 + 2 x num_random_blocks) x block_size tokens transformers needs for block-sparse; less than that is refused."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub checkpoint. Off unless you trust its author."""
    allow_pickle: bool = False
    """Accept checkpoints whose weights exist only as pickle files (pytorch_model.bin); unpickling can run code."""

    @model_validator(mode="after")
    def _sparse_rule_possible(self) -> "ModelSection":
        # Checked here when the recipe gives the block layout; otherwise against the checkpoint's layout
        # in checkpoints.check_model_settings (validate and run both call it before anything loads).
        from finetune.models.bigbird import min_sparse_length

        value = self.sparse_attention_min_length
        if value is None:
            return self
        if self.attention_type != "block_sparse":
            raise ValueError(
                f"model.sparse_attention_min_length applies only with model.attention_type block_sparse "
                f"(got attention_type {self.attention_type}); allowed: remove it, or set attention_type: block_sparse"
            )
        if self.block_size is not None and self.num_random_blocks is not None:
            shortest = min_sparse_length(self.block_size, self.num_random_blocks)
            if value < shortest:
                raise ValueError(
                    f"model.sparse_attention_min_length: {value} is below the {shortest} tokens block-sparse attention "
                    f"needs with block_size {self.block_size} and num_random_blocks {self.num_random_blocks}; "
                    f"allowed: at least {shortest}"
                )
        return self


class DataSection(_Section):
    dataset: str | None = None
    """Hub data set name for datasets.load_dataset (e.g. glue). Give this or `files`, not both."""
    dataset_config: str | None = None
    """Hub data set configuration (e.g. sst2 for glue)."""
    files: dict[str, str | list[str]] | None = None
    """Local files by split name, e.g. {train: data/train.csv, validation: data/dev.csv}: csv, tsv, json, jsonl, parquet, CoNLL or SQuAD JSON; a list of files makes one split."""
    format: Literal["auto", "conll", "squad"] = "auto"
    """How to read data.files: auto (by file ending; .conll is CoNLL), conll (token per line, tag in the last column, blank line between sentences) or squad (SQuAD v1.1 JSON)."""
    quoting: Literal["minimal", "none"] = "minimal"
    """CSV/TSV quoting: minimal (standard CSV quotes) or none (quote characters are plain text, as in GLUE's TSVs)."""
    column_names: list[str] | None = None
    """Names of the columns of CSV/TSV files that have no header row (the first row is then data)."""
    text_column: str = "text"
    """Column with the input text; token_classification: the column of word lists (CoNLL files: tokens); multiple_choice: the context."""
    text_pair_column: str | None = None
    """Column with the second text of sentence-pair tasks (e.g. MRPC's second sentence); multiple_choice: the start of every answer, joined before each ending (SWAG's sent2)."""
    label_column: str = "label"
    """Column with the gold label: a class name or id, a number for regression, a list (or separated string) for multi-label, a list of tags for token_classification (CoNLL files: ner_tags), the index of the correct choice for multiple_choice."""
    question_column: str = "question"
    """question_answering: column with the question."""
    context_column: str = "context"
    """question_answering: column with the text the answer is taken from."""
    answers_column: str = "answers"
    """question_answering: column with the gold answers, SQuAD style: {text: [...], answer_start: [...]}."""
    choice_columns: list[str] | None = None
    """multiple_choice (required there): the columns holding the candidate endings (e.g. [ending0, ending1, ending2, ending3]), or one column holding a list of them."""
    label_names: list[str] | None = None
    """Label names in id order. Default: a ClassLabel feature's names, else the sorted distinct values of the train split."""
    label_separator: str = ","
    """Multi-label: separator when the label column is a string such as '4,27'."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "validation"
    """Split to evaluate on; when the data has no such split, `validation_size` of train is carved off with the seed."""
    test_split: str | None = None
    """Optional split scored once with the best model at the end."""
    validation_size: float = Field(0.1, gt=0, lt=1)
    """Share of train carved off for evaluation when the data has no `eval_split`."""
    max_train_samples: int | None = Field(None, ge=1)
    """Use only the first N training examples (after shuffling with the seed), for quick runs."""
    max_eval_samples: int | None = Field(None, ge=1)
    """Evaluate on only the first N examples of the evaluation split."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataSection":
        if (self.dataset is None) == (self.files is None):
            raise ValueError("give exactly one of data.dataset (a hub data set) or data.files (local files)")
        return self


class TaskSection(TaskSettings):
    # The recipe's task section is the task settings plus what picks the task and the best model; unlike a
    # saved model's settings, unknown keys here are typos and refused.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True, frozen=False)

    type: str
    """The downstream task (one of the registered tasks, see `finetune fields`); a sentence-pair task is classification, regression or multi_label with data.text_pair_column set."""
    metric_for_best: str | None = None
    """Metric that picks the best checkpoint and drives early stopping (default: the task's main metric)."""
    extra_metrics: list[str] = []
    """More metrics, computed at every evaluation and logged beside the task's as eval/<name>/<key>: Hugging Face `evaluate` modules, each NAME_OR_PATH[,config=CONFIG][,KEY=VALUE...]: a hub name (the hub must be reachable), the path of a local module (a folder NAME holding NAME.py), or finetune:<task> for the task metrics finetune ships; e.g. [f1,average=macro]. They cannot be metric_for_best."""

    @model_serializer(mode="wrap")
    def _type_first(self, handler: Any) -> dict[str, Any]:
        # Printed and saved recipes read `type:` first, as they are written.
        dumped = handler(self)
        return {k: dumped[k] for k in ordered_fields(type(self)) if k in dumped}

    @field_validator("type")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            names = [repr(n) for n in TASKS]
            raise ValueError(f"Input should be {', '.join(names[:-1])} or {names[-1]}")
        return value

    @model_validator(mode="after")
    def _metric_known(self) -> "TaskSection":
        task = TASKS[self.type]
        if self.metric_for_best is None:
            self.metric_for_best = task.default_metric
        elif self.metric_for_best not in task.metrics:
            raise ValueError(
                f"task.metric_for_best: {self.metric_for_best!r} is not a {self.type} metric; "
                f"allowed: {', '.join(task.metrics)}"
            )
        return self


class TrainingSection(_Section):
    seed: int = 42
    """Seed for data order, weight init of the head, dropout and the carved validation split."""
    num_epochs: float = Field(3, gt=0)
    """Passes over the training data (fractions allowed); `max_steps` wins when set."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(32, ge=1)
    """Training examples per device per forward pass."""
    eval_batch_size: int = Field(64, ge=1)
    """Evaluation examples per device per forward pass."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Forward passes per optimizer step; the effective batch is batch_size x this x processes."""
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay; never applied to biases and LayerNorm weights."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    """Share of the optimizer steps spent warming up linearly from zero (ignored when warmup_steps is set)."""
    warmup_steps: int | None = Field(None, ge=0)
    """Warmup length in optimizer steps."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this (null: no clipping)."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto: bf16 on GPUs that support it, else fp16 on GPU; on a CPU, bf16 for the training forward pass when the CPU computes bf16 natively (AVX512-BF16 or AMX), else fp32. Evaluation on a CPU always runs in fp32, as serving does. fp16 needs a GPU. Block-sparse BigBird always trains in fp32 (transformers' block-sparse attention fails under autocast)."""
    eval_strategy: Literal["epoch", "steps"] = "epoch"
    """Evaluate after every epoch, or every `eval_steps` optimizer steps."""
    eval_steps: int | None = Field(None, ge=1)
    """Optimizer steps between evaluations when eval_strategy is steps."""
    logging_steps: int = Field(10, ge=1)
    """Optimizer steps between logged train loss, learning rate and throughput."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without improvement of task.metric_for_best (null: never)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes (0: batches are built in the training process)."""
    group_by_length: bool = True
    """Batch examples of similar length together so dynamic padding pads little: the data is shuffled, cut into mega-batches of 50 batches, each sorted by length and cut into batches, and the batches are shuffled. False: plain random batches."""
    compile: bool = False
    """torch.compile the model (TorchInductor). Off by default: on 2 CPU cores its compile time did not pay back over a run (BENCHMARKS.md); worth measuring on a GPU. Not with BigBird block-sparse attention."""
    save_total_limit: int = Field(2, ge=1)
    """Training-state checkpoints (for resuming) kept in output_dir/checkpoints; one is written at every evaluation."""

    @model_validator(mode="after")
    def _eval_steps_given(self) -> "TrainingSection":
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("training.eval_steps is required when training.eval_strategy is steps")
        return self


class TrackingSection(_Section):
    tracking_uri: str | None = None
    """MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str | None = None
    """MLflow experiment name (default: the recipe's name)."""
    run_name: str | None = None
    """MLflow run name (default: MLflow's generated one)."""
    log_model: bool = True
    """Log the best model to MLflow (pyfunc + transformers flavours) at the end of the run."""
    register_as: str | None = None
    """Register the best model under this MLflow model name; the `champion` alias moves to it only if it beats the current champion."""
    system_metrics: bool = True
    """Log CPU, memory (and GPU where present) usage while training."""


class Recipe(_Section):
    """One fine-tuning run, fully described."""

    name: str = "recipe"
    """Name of the recipe (default: the file name without .yaml); used for the experiment and output folder."""
    model: ModelSection
    data: DataSection
    task: TaskSection
    training: TrainingSection = TrainingSection()
    tracking: TrackingSection = TrackingSection()
    output_dir: str | None = None
    """Where checkpoints and the best model go (default: runs/<name>)."""

    @model_validator(mode="after")
    def _default_output_dir(self) -> "Recipe":
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"
        return self

    @model_validator(mode="after")
    def _task_needs(self) -> "Recipe":
        problems = TASKS[self.task.type].check_recipe(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _block_sparse_speed_settings(self) -> "Recipe":
        if self.model.attention_type != "block_sparse":
            return self
        # Block-sparse BigBird picks its attention per batch in Python (finetune.models.bigbird); a compiled graph would
        # freeze one choice or recompile on every switch.
        if self.training.compile:
            raise ValueError("training.compile cannot be used with model.attention_type block_sparse; "
                             "use original_full attention or training.compile: false")
        # transformers 5's block-sparse attention scatters its float32 softmax weights into a tensor of the
        # matmul's dtype, which autocast makes half precision: every autocast forward pass fails.
        if self.training.mixed_precision in ("bf16", "fp16"):
            raise ValueError(f"training.mixed_precision: {self.training.mixed_precision} cannot be used with "
                             "model.attention_type block_sparse (transformers' block-sparse attention fails under "
                             "autocast); allowed with block_sparse: auto (trains in fp32) or no")
        return self


# ---------------------------------------------------------------------------------------------
# loading: files, defaults, overrides
# ---------------------------------------------------------------------------------------------


MAX_RECIPE_BYTES = 1_000_000
"""A recipe file, or a file it names in `defaults`, larger than this is refused unread."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if "\x00" in str(path):
        raise RecipeError(f"recipe file name {str(path)[:200]!r} contains a NUL character")
    if path.is_dir():
        raise RecipeError(f"{path} is a directory; a recipe is a YAML file")
    if path.exists() and not path.is_file():
        raise RecipeError(f"{path} is not a regular file; a recipe is a YAML file")
    if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path} is {path.stat().st_size} bytes; a recipe file may be at most {MAX_RECIPE_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RecipeError(f"cannot read recipe file {path}: {type(e).__name__}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge `override` into `base`: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_with_defaults(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"recipe defaults form a cycle: {chain}")
    data = _read_yaml(path)
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) and d.strip() for d in defaults):
        raise RecipeError(f"{path}: `defaults` must be a list of recipe file names (relative to this file), "
                          f"got {repr(defaults)[:200]}")
    merged: dict[str, Any] = {}
    for base in defaults:
        if "\x00" in base:
            raise RecipeError(f"{path}: `defaults` entry {base[:200]!r} contains a NUL character")
        named = path.parent / base
        # defaults may name only recipe files: anything else (a key file, /etc/shadow) is refused unread.
        if not named.is_dir() and named.suffix.lower() not in (".yaml", ".yml"):
            raise RecipeError(f"{path}: `defaults` entry {base[:200]!r} is not a recipe file; allowed: .yaml or .yml files")
        merged = deep_merge(merged, _load_with_defaults(named, (*seen, path)))
    return deep_merge(merged, data)


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _field_annotation(dotted: str) -> Any:
    """The type the schema gives a dotted key, or a RecipeError naming the allowed keys."""
    model: type[BaseModel] = Recipe
    parts = dotted.split(".")
    prefix: list[str] = []
    annotation: Any = None
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(prefix) or "the recipe"
            hint = difflib.get_close_matches(part, list(fields), n=1)
            suggestion = f" (did you mean {'.'.join([*prefix, hint[0]])}?)" if hint else ""
            raise RecipeError(
                f"unknown recipe key {dotted!r}{suggestion}; keys allowed in {where}: {', '.join(fields)}"
            )
        annotation = _unwrap_optional(fields[part].annotation)
        prefix.append(part)
        rest = parts[i + 1 :]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not rest:
                raise RecipeError(f"{dotted!r} is a section; override one of its keys, e.g. {dotted}.{next(iter(annotation.model_fields))}=...")
            model = annotation
            continue
        if typing.get_origin(annotation) is dict and len(rest) == 1:
            return typing.get_args(annotation)[1]
        if rest:
            raise RecipeError(f"{'.'.join(prefix)!r} has no sub-keys; cannot override {dotted!r}")
        return annotation
    return annotation


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `dotted.key=value` override into its path and a value of the key's schema type."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like section.key=value, e.g. training.learning_rate=3e-5")
    key, raw = item.split("=", 1)
    key = key.strip()
    annotation = _field_annotation(key)
    if raw.strip().lower() in ("null", "none", "~"):
        return key.split("."), None
    try:
        value = TypeAdapter(annotation).validate_strings(raw)
    except (ValidationError, TypeError, AttributeError):
        try:
            # lists and mappings (e.g. data.label_names=[neg,pos]) are written as YAML/JSON
            value = TypeAdapter(annotation).validate_python(yaml.safe_load(raw))
        except (ValidationError, yaml.YAMLError) as e:
            raise RecipeError(f"override {key}={raw!r}: {_first_message(e)}") from None
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return key.split("."), value


def _first_message(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return error.errors()[0]["msg"]
    return str(error)


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def format_validation_error(error: ValidationError, source: str) -> str:
    """A message a person can act on: one line per problem, naming field, value and what is allowed."""
    lines = [f"{source}: the recipe is not valid:"]
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(recipe)"
        if err["type"] == "extra_forbidden":
            parent_model = _section_model(err["loc"][:-1])
            allowed = list(parent_model.model_fields) if parent_model else []
            hint = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            lines.append(f"  - {loc}: unknown key{suggestion}; allowed here: {', '.join(allowed)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else f" (got {json.dumps(value, default=str)})"
        lines.append(f"  - {loc}: {msg}{shown}")
    return "\n".join(lines)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = _unwrap_optional(field.annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply its defaults and the command-line overrides, and validate it."""
    path = Path(path)
    data = _load_with_defaults(path)
    data.setdefault("name", path.stem)
    for item in overrides:
        keys, value = parse_override(item)
        _set_path(data, keys, value)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, str(path))) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as it is printed and saved with every run."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys, e.g. {'training': {'seed': 1}} -> {'training.seed': 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def ordered_fields(model: type[BaseModel]) -> dict[str, Any]:
    """A section's fields, its own before those it inherits (the task section: type first, then the settings)."""
    own = [n for n in getattr(model, "__annotations__", {}) if n in model.model_fields]
    return {n: model.model_fields[n] for n in own + [n for n in model.model_fields if n not in own]}


def describe_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """One help line per recipe key, from the attribute docstrings: `key (type, default): text`."""
    lines = []
    for name, field in ordered_fields(model).items():
        annotation = _unwrap_optional(field.annotation)
        dotted = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{dotted}:")
            lines.extend(describe_fields(annotation, f"{dotted}."))
            continue
        type_name = " | ".join(TASKS) if dotted == "task.type" else _type_name(field.annotation)
        default = "required" if field.is_required() else f"default {json.dumps(field.default)}"
        lines.append(f"  {dotted} ({type_name}, {default}): {field.description or ''}")
    return lines


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))
