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
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_serializer, model_validator

from finetune.errors import RecipeError
from finetune.files import RefusedDocument, load_yaml
from finetune.files import short as _short
from finetune.tasks import TASKS, TaskSettings

__all__ = ["Recipe", "RecipeError", "AdapterSection", "ModelSection", "DataSection", "TaskSection", "TrainingSection",
           "TrackingSection", "DistillationSection", "load_recipe", "parse_override", "recipe_to_yaml", "flatten",
           "describe_fields"]


class _Section(BaseModel):
    # Infinity and NaN are never a setting: `num_epochs: .inf` would pass and then crash the run.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True, allow_inf_nan=False)


# Upper bounds of the numeric fields, so that every value `validate` accepts, `run` can use.
MAX_TOKENS = 16384
"""The longest model.max_length; no token count or length in the recipe may exceed it."""
MAX_COUNT = 2**31 - 1
"""Counts of steps, examples and evaluations: at most what a 32-bit index holds (torch, numpy, C loops)."""
MAX_SEED = 2**32 - 1
"""numpy (which Accelerate's set_seed seeds) takes seeds 0 to 2**32 - 1."""


class AdapterSection(_Section):
    type: Literal["lora"] = "lora"
    """The adapter kind (the peft library's LoRA: low-rank updates added to the encoder's linear layers)."""
    r: int = Field(8, ge=1, le=1024)
    """Rank of the low-rank update of each adapted layer."""
    alpha: float = Field(16, gt=0, le=4096)
    """LoRA scaling: the update is multiplied by alpha / r."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the adapted layers' inputs to the low-rank update, while training."""
    target_modules: list[str] | None = None
    """Names of the linear layers to adapt (the last part of the module name, e.g. [query, value] for BERT, [q_lin, v_lin] for DistilBERT). Default: the checkpoint family's attention query and value projections (its module in finetune/families says which; ModernBERT's are one fused Wqkv). Names the model lacks are refused with the ones it has."""


class ModelSection(_Section):
    checkpoint: str
    """What to start from: a Hugging Face hub id (e.g. bert-base-uncased) or a local directory saved with save_pretrained (a pretrained encoder: a fresh head is added), or a fine-tuned model as finetune predict takes it: an MLflow run id, runs:/ID/model, models:/NAME@ALIAS, models:/NAME/VERSION, or a runs/<name>/best folder (its encoder is reused, and its head too when the task and label set are the same; otherwise a fresh head replaces it, and the run says so)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the checkpoint; ignored for local directories."""
    max_length: int = Field(128, ge=8, le=MAX_TOKENS)
    """Longest input in tokens; longer inputs are truncated (validate reports how many)."""
    pad_to_multiple_of: int | None = Field(None, ge=1, le=MAX_TOKENS)
    """Each batch is padded to its longest input rounded up to a multiple of this many tokens (1: exactly the longest). Fewer distinct batch shapes: a CPU sets its matrix kernels up once per shape (bf16 above all) and the memory allocator keeps fewer odd-sized blocks. Default (unset): 16 when max_length is 256 or more (QA: 15% lower peak memory, same speed) or training runs bf16 on a CPU, 32 when both (QA in bf16: 2.84 GiB peak, 10% below 16); else 1 (short sentences: rounding up to 16 cost 10-30% of fp32 training speed); BENCHMARKS.md. Saved with the model: evaluation, predict and serve pad the same way. Not beyond the checkpoint's positions (then it pads to the longest)."""
    attention_dropout: float | None = Field(None, ge=0, lt=1)
    """Dropout on the attention probabilities while training (default: the checkpoint's, 0.1 for BERT, MiniLM and DistilBERT). 0 lets PyTorch's fused attention kernel run on a CPU: with dropout it falls back to one that keeps every layer's attention matrix for the backward pass. A MiniLM step at batch 32 x 256 tokens: 1.75 GiB above the loaded model instead of 3.66 GiB, in about half the time (bench/activation_memory.py). Short texts gain little."""
    attention_type: Literal["block_sparse", "original_full"] | None = None
    """BigBird only, and required there: block_sparse or original_full attention. Never switched silently."""
    block_size: int | None = Field(None, ge=1, le=MAX_TOKENS)
    """BigBird only: block size of sparse attention (default: the checkpoint's). Inputs are padded to a multiple of it."""
    num_random_blocks: int | None = Field(None, ge=0, le=MAX_TOKENS)
    """BigBird only: random blocks each query block attends to (default: the checkpoint's)."""
    sparse_attention_min_length: int | None = Field(None, ge=1, le=MAX_TOKENS)
    """BigBird block_sparse only: a batch runs block-sparse attention when its padded length is at least this many tokens, full attention otherwise (chosen per batch, restored after it; the same rule in training, evaluation and serving). Default: (6 + 2 x num_random_blocks) x block_size, the shortest padded length above the (5 + 2 x num_random_blocks) x block_size tokens transformers needs for block-sparse; less than that is refused."""
    pooling: Literal["auto", "first", "mean"] = "auto"
    """What the head of a sentence task (classification, multi_label, regression) or multiple_choice reads from the encoder: first (the first token's final hidden state, through the family's pooler where it has one: BERT's dense + tanh), mean (the mean over the input's tokens, what sentence-transformers bodies such as the offline MiniLM were trained for), or auto (the checkpoint's own: first for most families, ModernBERT's and EuroBERT's classifier_pooling). Saved with the model, so evaluation, predict, serve, ONNX and the frozen-encoder cache read the same."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub checkpoint. Off unless you trust its author."""
    allow_pickle: bool = False
    """Accept checkpoints whose weights exist only as pickle files (pytorch_model.bin); unpickling can run code."""
    adapter: AdapterSection | None = None
    """Train a LoRA adapter instead of the encoder's weights: {type: lora, r, alpha, dropout, target_modules}. The encoder stays frozen; the adapter and the task head train, and the saved model is the adapter, the head and a reference to the base checkpoint (a few MB). null: full fine-tuning."""

    @model_validator(mode="after")
    def _block_fits(self) -> "ModelSection":
        # Inputs are padded to a multiple of block_size (with either attention type): a block longer than the
        # longest input would pad every batch to it.
        if self.block_size is not None and self.block_size > self.max_length:
            raise ValueError(f"model.block_size: {self.block_size} is longer than model.max_length {self.max_length}; "
                             f"allowed: 1 to {self.max_length}")
        return self

    @model_validator(mode="after")
    def _sparse_rule_possible(self) -> "ModelSection":
        # Checked here when the recipe gives the block layout; otherwise against the checkpoint's layout
        # in the BigBird family's check_settings (validate and run both call it before anything loads).
        from finetune.families.big_bird import min_sparse_length

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


def text_encoding(value: str) -> str:
    """`value` if it names a text encoding Python can read files with (data.encoding, `predict --encoding`), else
    ValueError with a message listing examples."""
    import codecs

    try:
        # base64, rot13 and the like are codecs too, but not text encodings a file can be read with.
        known = codecs.lookup(value)._is_text_encoding
    except LookupError:
        known = False
    if not known:
        raise ValueError(f"unknown text encoding {value!r}; allowed: a Python codec name such as utf-8, "
                         "utf-8-sig, cp949, euc-kr, shift_jis, gb18030, latin-1")
    return value


class DataSection(_Section):
    dataset: str | None = None
    """Hub data set name for datasets.load_dataset (e.g. glue). Give this or `files`, not both."""
    dataset_config: str | None = None
    """Hub data set configuration (e.g. sst2 for glue)."""
    files: dict[str, str | list[str]] | None = None
    """Local files by split name, e.g. {train: data/train.csv, validation: data/dev.csv}: csv, tsv, json, jsonl, parquet, txt (one text per line, column `text`), CoNLL or SQuAD JSON; a list of files makes one split."""
    texts_from: str | None = None
    """masked_lm: pretrain on the training texts of another recipe (a YAML file, relative to the directory you run from): every text column its task reads, of its whole train split (its max_train_samples is not applied), in data.text_column; the held-out share is carved from them (data.validation_size). Give this, `dataset` or `files`."""
    format: Literal["auto", "conll", "squad"] = "auto"
    """How to read data.files: auto (by file ending; .conll is CoNLL), conll (token per line, tag in the last column, blank line between sentences) or squad (SQuAD v1.1 JSON)."""
    quoting: Literal["minimal", "none"] = "minimal"
    """CSV/TSV quoting: minimal (standard CSV quotes) or none (quote characters are plain text, as in GLUE's TSVs)."""
    column_names: list[str] | None = None
    """Names of the columns of CSV/TSV files that have no header row (the first row is then data)."""
    encoding: str = "utf-8"
    """Text encoding of csv, tsv, json, jsonl, txt, CoNLL and SQuAD files: a Python codec name such as utf-8 (the default; a byte-order mark is skipped), cp949 (what Korean Excel saves; a superset of euc-kr), euc-kr, shift_jis, gb18030, latin-1. A file that does not decode is refused before training, naming the line and byte and the encoding that would read it."""
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
    max_train_samples: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Use only the first N training examples (after shuffling with the seed), for quick runs."""
    max_eval_samples: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Evaluate on only the first N examples of the evaluation split."""
    max_train_samples_per_class: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Train on N examples of each class, drawn with training.seed (another seed draws others), for few-label studies and to see how many labels a task needs. classification: N of each class; a class with fewer is taken whole (the run says so). multi_label: the labels are visited rarest first, and each gets examples carrying it until N of the drawn examples carry it (an example drawn for one label counts for all it carries); examples with no label count as one more class. Drawn after the evaluation split is carved. Not with max_train_samples."""

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        return text_encoding(value)

    @model_validator(mode="after")
    def _one_source(self) -> "DataSection":
        if self.texts_from is not None:
            if self.dataset is not None or self.files is not None:
                raise ValueError("data.texts_from takes the texts of another recipe; give it alone, without "
                                 "data.dataset or data.files")
            return self
        if (self.dataset is None) == (self.files is None):
            raise ValueError("give exactly one of data.dataset (a hub data set) or data.files (local files)")
        return self

    @model_validator(mode="after")
    def _one_way_to_sample(self) -> "DataSection":
        if self.max_train_samples is not None and self.max_train_samples_per_class is not None:
            raise ValueError("give data.max_train_samples (the first N after shuffling) or data.max_train_samples_per_class "
                             "(N of each class), not both")
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
    """More metrics, computed at every evaluation and logged beside the task's as eval/<name>/<key>: Hugging Face `evaluate` modules, each NAME_OR_PATH[,config=CONFIG][,KEY=VALUE...]: a hub name (the hub must be reachable), the path of a local module (a folder NAME holding NAME.py), or finetune:<task> for the task metrics finetune ships; e.g. [f1,average=macro]. They cannot be metric_for_best. Hub names and local modules are Python scripts that evaluate.load runs: they need task.allow_metric_code."""
    allow_metric_code: bool = False
    """Allow task.extra_metrics to name hub metrics and local metric modules, whose Python scripts evaluate.load imports and runs in this process (a hub name downloads its script, or takes a folder of that name in the working directory). Off by default, as model.trust_remote_code is: a recipe is data, and only the finetune:<task> modules finetune ships load without it."""

    @model_serializer(mode="wrap")
    def _type_first(self, handler: Any) -> dict[str, Any]:
        # Printed and saved recipes read `type:` first, as they are written.
        dumped = handler(self)
        return {k: dumped[k] for k in ordered_fields(type(self)) if k in dumped}

    @field_validator("type")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            # The list names the fine-tuning tasks; a near miss of a pretraining one (masked_lm) is named instead.
            names = [repr(n) for n, task in TASKS.items() if task.serves]
            close = difflib.get_close_matches(value, list(TASKS), n=1)
            if close and not TASKS[close[0]].serves:
                raise ValueError(f"Input should be {close[0]!r} (continued pretraining, `finetune pretrain`) or a "
                                 f"fine-tuning task: {', '.join(names)}")
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


CONTRASTIVE_TASKS = ("classification", "multi_label")
"""The tasks training.method: contrastive is for: one label set per text, what same/different-class pairs describe."""


class ContrastiveSection(_Section):
    iterations: int = Field(20, ge=1, le=10_000)
    """Rounds of pair sampling (SetFit's num_iterations): in each, every training example gets one positive pair (another example of its class; multi_label: one sharing a label) and one negative pair (one of another class; multi_label: sharing none), so 2 x iterations pairs per example."""
    sampling: Literal["random", "unique"] = "random"
    """How the partners are picked, for the same number of pairs: random (each example's positive and negative partner drawn at random in every round) or unique (SetFit 1.2's: every distinct pair of examples, an example with itself as a positive included, taken in a shuffled order and cycled until each kind has iterations x examples pairs, so every pair is seen about equally often)."""
    max_pairs: int | None = Field(None, ge=1, le=MAX_COUNT)
    """At most this many pairs (a random subset of the sampled ones, with training.seed); null: all."""
    loss: Literal["cosine", "cosent"] = "cosine"
    """The pair loss (sentence-transformers'): cosine (CosineSimilarityLoss, SetFit's: the squared difference between the pair's cosine similarity and 1 or 0) or cosent (CoSENTLoss: ranks every positive pair of a batch above every negative one)."""
    learning_rate: float = Field(2e-5, gt=0, lt=1)
    """Peak learning rate of the body during the pair phase (AdamW, linear warmup over 10% of its steps then linear decay; SetFit's default)."""
    batch_size: int = Field(16, ge=1, le=MAX_COUNT)
    """Pairs per step of the pair phase."""
    label_template: str | None = None
    """Where the class names are words (negative, Sports, billing), a sentence with {} where a name goes, e.g. "This sentence is {}.": for each class, label_examples copies of it with the class's name join the training split (as examples of that class; multi_label: of that label alone), so the pairs and the head also learn from what the names say. SetFit's templated examples; with 8 labelled sentences per class of SST-2 they added 9.5 points (8.5 to 10.3 by draw, BENCHMARKS.md). null: none. Leave it null where the names are codes (0, 1, LABEL_2)."""
    label_examples: int = Field(8, ge=1, le=10_000)
    """Copies of each class's label_template sentence in the training split."""

    @field_validator("label_template")
    @classmethod
    def _one_slot(cls, value: str | None) -> str | None:
        # Filled by replacing "{}", never str.format: a recipe's text must not reach attribute lookups.
        if value is not None and (value.count("{}") != 1 or not value.replace("{}", "").strip()):
            raise ValueError(f"training.contrastive.label_template {_short(value)!r} must hold {{}} exactly once (where a "
                             "class's name goes) and some words around it, e.g. 'This sentence is {}.'")
        return value


class TrainingSection(_Section):
    seed: int = Field(42, ge=0, le=MAX_SEED)
    """Seed for data order, weight init of the head, dropout and the carved validation split (0 to 2**32 - 1)."""
    num_epochs: float = Field(3, gt=0, le=1_000_000)
    """Passes over the training data (fractions allowed); `max_steps` wins when set."""
    max_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(32, ge=1, le=MAX_COUNT)
    """Training examples per device per forward pass."""
    eval_batch_size: int = Field(64, ge=1, le=MAX_COUNT)
    """Evaluation examples per device per forward pass."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_COUNT)
    """Forward passes per optimizer step; the effective batch is batch_size x this x processes."""
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.01, ge=0, le=10)
    """AdamW weight decay; never applied to biases and LayerNorm weights."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    """Share of the optimizer steps spent warming up linearly from zero (ignored when warmup_steps is set)."""
    warmup_steps: int | None = Field(None, ge=0, le=MAX_COUNT)
    """Warmup length in optimizer steps."""
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6)
    """Clip the global gradient norm to this (null: no clipping)."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto: bf16 on GPUs that support it, else fp16 on GPU; on a CPU, bf16 for the training forward pass when the CPU computes bf16 natively (AVX512-BF16 or AMX) and a start-up measurement finds it at least 1.1x faster than fp32 there, else fp32. Evaluation on a CPU always runs in fp32, as serving does. training.method contrastive's pair phase computes in bf16 autocast too when this resolves to bf16 (on a GPU with fp16, the pair phase stays fp32). fp16 needs a GPU. Block-sparse BigBird follows the same rule: its sparse attention core alone is computed in fp32 (transformers' fails under autocast), every linear layer in the chosen precision."""
    eval_strategy: Literal["epoch", "steps"] = "epoch"
    """Evaluate after every epoch, or every `eval_steps` optimizer steps."""
    eval_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Optimizer steps between evaluations when eval_strategy is steps."""
    logging_steps: int = Field(10, ge=1, le=MAX_COUNT)
    """Optimizer steps between logged train loss, learning rate and throughput."""
    early_stopping_patience: int | None = Field(None, ge=1, le=MAX_COUNT)
    """Stop after this many evaluations without improvement of task.metric_for_best (null: never)."""
    num_workers: int = Field(0, ge=0, le=256)
    """DataLoader worker processes (0: batches are built in the training process)."""
    group_by_length: bool = True
    """Batch examples of similar length together so dynamic padding pads little: the data is shuffled, cut into mega-batches of 50 batches, each sorted by length and cut into batches, and the batches are shuffled. False: plain random batches."""
    threads: int | None = Field(None, ge=1, le=1024)
    """Threads the math of each training process uses on a CPU. Unset (the default): the CPUs this process may run on (affinity mask, container CPU quota), shared among the processes of `accelerate launch`, and fewer while other processes keep cores busy, re-measured every second (a 2-thread run with one of two cores taken by another job otherwise runs ~10x slower, BENCHMARKS.md). A number fixes it; so does the FINETUNE_THREADS environment variable."""
    gradient_checkpointing: bool = False
    """Recompute each encoder layer's activations during the backward pass instead of keeping them: far less memory for long inputs and large batches (a MiniLM step at 32 x 256 tokens: 1.55 GiB above the loaded model instead of 3.66 GiB), at the price of a second forward pass (1.3x the step time). Dropout is replayed exactly, so the gradients are the same."""
    compile: bool = False
    """torch.compile the model (TorchInductor). Off by default: on 2 CPU cores its compile time did not pay back over a run (BENCHMARKS.md); worth measuring on a GPU. Not with BigBird block-sparse attention."""
    save_total_limit: int = Field(2, ge=1, le=1000)
    """Training-state checkpoints (for resuming) kept in output_dir/checkpoints; one is written at every evaluation."""
    keep_checkpoints: bool = False
    """Keep the training-state checkpoints when the run finishes. A finished run is never resumed, so by default they are deleted (each holds the weights and AdamW's two moments, about 3x the model) and only best/ stays; keep them to continue training later with --resume and a larger max_steps."""
    freeze: Union[Literal["none", "embeddings", "encoder"], Annotated[int, Field(ge=1, le=1000)]] = "none"
    """What does not train: none; embeddings; N (an integer: the embeddings and the first N encoder layers); encoder (the whole encoder: a linear probe on frozen features, whose encoder outputs are then computed once per text and cached, so only the head trains). BERT's pooler counts as the head and always trains. Frozen parameters get no gradient and no optimizer state. Not with model.adapter (which freezes the encoder itself)."""
    layer_lr_decay: float | None = Field(None, gt=0, le=1)
    """Layer-wise learning-rate decay: the top encoder layer trains at learning_rate, each layer below at this factor times the one above, the embeddings lowest (learning_rate x decay^layers). null: one learning rate for the encoder."""
    head_learning_rate: float | None = Field(None, gt=0, lt=1)
    """Learning rate of the task head (the parameters outside the encoder, and BERT's pooler, which only the head reads). null: learning_rate."""
    method: Literal["standard", "contrastive"] = "standard"
    """standard: the training loop fine-tunes the model on the labels as this section says. contrastive (classification and multi_label, few labels; docs/guides/few-labels.md): first the encoder learns from pairs of training texts, pulled together when they share a class and apart when not (SetFit's method, with sentence-transformers; training.contrastive), using the pooling the head will read (model.pooling; auto: the checkpoint's sentence-transformers pooling, mean for the offline MiniLM); then the loop trains the head as set below (with freeze: encoder, the head alone on the frozen embeddings, as SetFit's logistic regression does). The result is an ordinary model folder."""
    contrastive: ContrastiveSection = ContrastiveSection()
    """The pair phase of method: contrastive (ignored by standard)."""
    head_only_steps: int = Field(0, ge=0, le=MAX_COUNT)
    """Train the head alone first: for this many optimizer steps the encoder's learning rate is 0 (its weights do not move), then everything trains, the encoder with a warmup of its own (warmup_steps or warmup_ratio of the steps left). Linear probing then fine-tuning (Kumar et al., 2022): a new head initialised at random otherwise sends its noisy gradients into the pretrained encoder, e.g. a masked-language-model head added to an encoder that ships without one. The logged train/learning_rate is the encoder's. 0: off. Not with freeze: encoder (nothing else would ever train)."""

    @model_validator(mode="after")
    def _head_only_steps_leave_an_encoder(self) -> "TrainingSection":
        if self.head_only_steps and self.freeze == "encoder":
            raise ValueError("training.head_only_steps cannot be used with training.freeze: encoder (the encoder never "
                             "trains, so there is no later phase); allowed: head_only_steps 0, or freeze none, "
                             "embeddings or a number of layers")
        return self

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


class DistillationSection(_Section):
    teacher: str = Field(min_length=1)
    """The teacher model: anything `finetune predict` accepts (a model folder, an MLflow run id, a runs:/ or models:/ URI), trained on the same task and label set. Its outputs on every training example are computed once, before training, and cached with the features."""
    temperature: float = Field(2.0, gt=0, le=100)
    """Softens both models' outputs before they are compared (classification: softmax(logits / T); multi_label: sigmoid(logits / T)); the distillation term is scaled by T squared so its gradients keep their size. Not used by regression, which matches the teacher's values."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the distillation term: loss = (1 - alpha) x the task's loss + alpha x T^2 x KL(teacher || student) (regression: the squared difference to the teacher's value). 0 trains on the labels alone, 1 on the teacher alone."""
    teacher_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """How the teacher computes its outputs, once before training: fp32, or bf16 autocast (faster where the CPU computes bf16 natively, as bf16 training is; the softened targets need no more than bf16's three significant digits). auto: bf16 when the student trains in bf16 on a CPU (training.mixed_precision), else fp32. The outputs are cached per precision."""
    hidden_weight: float = Field(0.0, ge=0, le=1000)
    """Adds hidden_weight x the mean squared difference between the student's and the teacher's last hidden state of the first token ([CLS]), cached like the outputs; only when both models have the same hidden size. 0: off."""


class Recipe(_Section):
    """One fine-tuning run, fully described."""

    name: str = "recipe"
    """Name of the recipe (default: the file name without .yaml); used for the experiment and output folder."""
    model: ModelSection
    data: DataSection
    task: TaskSection
    training: TrainingSection = TrainingSection()
    tracking: TrackingSection = TrackingSection()
    distillation: DistillationSection | None = None
    """Train against a teacher model's outputs as well as the labels (classification, multi_label and regression)."""
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
    def _contrastive_fits(self) -> "Recipe":
        if self.training.method != "contrastive":
            return self
        if self.task.type not in CONTRASTIVE_TASKS:
            raise ValueError(f"training.method: contrastive is for task.type {' or '.join(CONTRASTIVE_TASKS)}, not "
                             f"{self.task.type}; allowed for {self.task.type}: standard")
        if self.data.text_pair_column is not None:
            raise ValueError("training.method: contrastive compares single texts; it cannot be used with "
                             "data.text_pair_column (sentence pairs); allowed here: standard")
        if self.model.adapter is not None or self.distillation is not None:
            raise ValueError("training.method: contrastive trains the whole encoder on pairs first; it cannot be used "
                             "with model.adapter or distillation; allowed with them: standard")
        return self

    @model_validator(mode="after")
    def _one_way_to_freeze(self) -> "Recipe":
        if self.model.adapter is not None and self.training.freeze != "none":
            raise ValueError(f"training.freeze: {self.training.freeze} cannot be used with model.adapter, which already "
                             "freezes the whole encoder (only the adapter and the head train); allowed with an adapter: none")
        return self

    @model_validator(mode="after")
    def _distillation_fits(self) -> "Recipe":
        if self.distillation is None:
            return self
        from finetune.tasks.distillation import DISTILLATION_LOSSES

        if self.task.type not in DISTILLATION_LOSSES:
            able = list(DISTILLATION_LOSSES)
            raise ValueError(f"distillation is for {', '.join(able[:-1])} and {able[-1]} recipes, not task.type "
                             f"{self.task.type}")
        if self.task.long_inputs == "chunk":
            raise ValueError("distillation cannot be used with task.long_inputs: chunk (the teacher's outputs are "
                             "per text, the student trains on windows); allowed: long_inputs: truncate")
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
        return self


# ---------------------------------------------------------------------------------------------
# loading: files, defaults, overrides
# ---------------------------------------------------------------------------------------------


MAX_RECIPE_BYTES = 1_000_000
"""A recipe file, or a file it names in `defaults`, larger than this is refused unread."""
MAX_RECIPE_NODES = 100_000
"""YAML nodes (mappings, lists, scalars) a recipe may hold once its aliases are expanded; recipes hold hundreds."""
MAX_RECIPE_DEPTH = 64
"""Levels of nesting a recipe may have (its sections nest three or four deep)."""


def _safe_load(text: str) -> Any:
    """yaml.safe_load, bounded to a recipe's size (`finetune.files.load_yaml`); raises RefusedDocument."""
    return load_yaml(text, MAX_RECIPE_NODES, MAX_RECIPE_DEPTH, MAX_RECIPE_BYTES)


def _refusal(error: RefusedDocument) -> str:
    """`is not valid YAML: ...` or `is refused: ...`, to follow the name of what was read."""
    message = str(error)
    return f"is {message}" if message.startswith("not valid YAML") else f"is refused: {message}"


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
        data = _safe_load(text)
    except RefusedDocument as e:
        raise RecipeError(f"{path} {_refusal(e)}") from None
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
                          f"got {_short(repr(defaults))}")
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
    word = raw.strip().lower()
    if word == "none" and _literal_choice(annotation, "none"):
        return key.split("."), "none"  # the field's own value named none (data.quoting, training.freeze, ...)
    if word in ("null", "none", "~"):
        return key.split("."), None
    try:
        value = TypeAdapter(annotation).validate_strings(raw)
    except (ValidationError, TypeError, AttributeError):
        try:
            # lists and mappings (e.g. data.label_names=[neg,pos]) are written as YAML/JSON
            value = TypeAdapter(annotation).validate_python(_safe_load(raw))
        except (ValidationError, RefusedDocument) as e:
            raise RecipeError(f"override {_short(key)}={_short(raw)!r}: {_first_message(e)}") from None
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return key.split("."), value


def _literal_choice(annotation: Any, value: str) -> bool:
    """Whether `value` is one of the schema type's Literal choices (e.g. quoting: minimal | none), as opposed to
    free text that would take any word."""
    if typing.get_origin(annotation) is Literal:
        return value in typing.get_args(annotation)
    return any(_literal_choice(arg, value) for arg in typing.get_args(annotation))


def _first_message(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return _short(error.errors()[0]["msg"], 300)
    return _short(str(error), 300)


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
        loc = _short(".".join(str(p) for p in err["loc"]), 120) or "(recipe)"
        if err["type"] == "extra_forbidden":
            parent_model = _section_model(err["loc"][:-1])
            allowed = list(parent_model.model_fields) if parent_model else []
            hint = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            lines.append(f"  - {loc}: unknown key{suggestion}; allowed here: {', '.join(allowed)}")
            continue
        msg = _short(err["msg"].removeprefix("Value error, "), 400)
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else \
            f" (got {_short(json.dumps(value, default=str))})"
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
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)  # Hangul as Hangul


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
    if origin is Annotated:  # constrained numbers: the constraint is in the field's text
        return _type_name(typing.get_args(annotation)[0])
    if origin is list:
        return f"list[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))
