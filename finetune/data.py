"""Loading, checking, labelling, splitting and tokenising the data a recipe names.

Everything here uses `datasets`; what it adds is the checks (with messages naming the column
and the values found), a stable label order, the carved validation split, and a tokenisation
cache keyed by content so a rerun does not tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from finetune.readers import FormatError, rows_from_files
from finetune.recipe import DataSection, Recipe
from finetune.tasks import FeatureContext, TaskDefinition, TaskSettings

log = logging.getLogger(__name__)

# File endings -> (datasets builder, extra builder arguments).
FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}

CACHE_ENV = "FINETUNE_CACHE_DIR"


class DataError(ValueError):
    """Data that does not fit the recipe; the message names the column, the value and what is allowed."""


@dataclass
class PreparedData:
    """Tokenised splits ready for a DataLoader, plus what is needed to read them."""

    train: datasets.Dataset
    eval: datasets.Dataset
    test: datasets.Dataset | None
    label_names: list[str] | None
    raw_train: datasets.Dataset
    raw_eval: datasets.Dataset
    cache_hit: bool = False
    eval_features: datasets.Dataset | None = None
    """The evaluation features with the columns only post-processing reads (QA: example ids, offsets)."""
    test_features: datasets.Dataset | None = None
    raw_test: datasets.Dataset | None = None


# ---------------------------------------------------------------------------------------------
# raw loading
# ---------------------------------------------------------------------------------------------


def load_raw(data: DataSection) -> datasets.DatasetDict:
    """Load every split the recipe names, from the hub or from local files."""
    if data.dataset is not None:
        try:
            return datasets.load_dataset(data.dataset, data.dataset_config)
        except Exception as e:  # datasets raises many types for "unreachable"/"not found"
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
            raise DataError(
                f"data.dataset: cannot load {data.dataset!r}"
                f"{' (config ' + repr(data.dataset_config) + ')' if data.dataset_config else ''}: "
                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}\n"
                f"  {'Offline mode is on; ' if offline else ''}without internet, download it elsewhere and use "
                "data.files with local csv/tsv/json/jsonl/parquet files instead."
            ) from None
    assert data.files is not None
    files = {split: [names] if isinstance(names, str) else list(names) for split, names in data.files.items()}
    for split, names in files.items():
        if not names:
            raise DataError(f"data.files.{split}: no files given")
        for name in names:
            if not Path(name).is_file():
                raise DataError(f"data.files.{split}: file not found: {name} (resolved to {Path(name).resolve()})")
    reader = data.format
    if reader == "auto" and all(Path(n).suffix.lower() == ".conll" for names in files.values() for n in names):
        reader = "conll"
    if reader != "auto":
        return _read_with(reader, files)
    builders = set()
    kwargs: dict[str, Any] = {}
    for split, names in files.items():
        for name in names:
            suffix = Path(name).suffix.lower()
            if suffix not in FILE_FORMATS:
                raise DataError(
                    f"data.files.{split}: {name} has an unknown ending {suffix!r}; allowed: {', '.join(FILE_FORMATS)} "
                    "(or set data.format to conll or squad)"
                )
            builder, extra = FILE_FORMATS[suffix]
            builders.add(builder)
            kwargs.update(extra)
    if len(builders) > 1:
        raise DataError(f"data.files: all splits must share one format, got {', '.join(sorted(builders))}")
    builder = builders.pop()
    if builder == "csv":
        kwargs["quoting"] = 3 if data.quoting == "none" else 0  # csv.QUOTE_NONE / QUOTE_MINIMAL
        kwargs["keep_default_na"] = False  # the text "null" or "NA" is a sentence, not a missing value
        if data.column_names:
            kwargs["column_names"] = list(data.column_names)
    resolved = {split: [str(Path(p).resolve()) for p in names] for split, names in files.items()}
    return datasets.load_dataset(builder, data_files=resolved, **kwargs)


def _read_with(reader: str, files: dict[str, list[str]]) -> datasets.DatasetDict:
    """CoNLL or SQuAD files, one Dataset per split."""
    splits = {}
    for split, names in files.items():
        paths = [str(Path(n).resolve()) for n in names]
        stamps = [(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
        try:
            # from_generator keys its cache on these arguments, so edited files are read again.
            splits[split] = datasets.Dataset.from_generator(
                rows_from_files, gen_kwargs={"reader": reader, "paths": paths, "stamps": stamps}, split=split)
        except FormatError as e:
            raise DataError(f"data.files.{split}: {e}") from None
        except Exception as e:  # datasets wraps generator errors in its own type
            cause = e.__cause__ or e.__context__
            if isinstance(cause, FormatError):
                raise DataError(f"data.files.{split}: {cause}") from None
            raise
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------
# checks and labels
# ---------------------------------------------------------------------------------------------


def check_columns(raw: datasets.DatasetDict, data: DataSection, task: TaskDefinition) -> None:
    """Every split used must have the columns the recipe names for its task."""
    wanted = task.columns(data)
    for split_name, split in raw.items():
        for key, column in wanted.items():
            if column not in split.column_names:
                raise DataError(
                    f"{key}: column {column!r} is not in split {split_name!r}; "
                    f"columns found: {', '.join(split.column_names)}"
                )
    if data.train_split not in raw:
        raise DataError(f"data.train_split: no split {data.train_split!r}; splits found: {', '.join(raw)}")
    if data.test_split and data.test_split not in raw:
        raise DataError(f"data.test_split: no split {data.test_split!r}; splits found: {', '.join(raw)}")


def _multi_label_tokens(value: Any, separator: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(separator) if t.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _as_int(token: Any) -> int | None:
    if isinstance(token, (bool, np.bool_)):
        return None
    if isinstance(token, (int, np.integer)):
        return int(token)
    if isinstance(token, str) and token.strip().lstrip("-").isdigit():
        return int(token)
    return None


def _sorted_values(values: set[Any]) -> list[str]:
    """Stable label order: numerically when every value is an integer, else alphabetically."""
    if values and all(_as_int(v) is not None for v in values):
        return [str(v) for v in sorted({_as_int(v) for v in values})]
    return sorted(str(v) for v in values)


def resolve_label_names(train: datasets.Dataset, data: DataSection, task: TaskDefinition) -> list[str] | None:
    """Label names in id order: from the recipe, a ClassLabel feature, or the train split's values."""
    if not task.has_label_names:
        return None
    feature = train.features[data.label_column]
    inner = getattr(feature, "feature", None)  # Sequence(ClassLabel) / List(ClassLabel) for multi-label
    class_label = feature if isinstance(feature, datasets.ClassLabel) else inner
    if isinstance(class_label, datasets.ClassLabel):
        if data.label_names and len(data.label_names) != class_label.num_classes:
            raise DataError(
                f"data.label_names: {len(data.label_names)} names given but column {data.label_column!r} "
                f"has {class_label.num_classes} classes: {class_label.names}"
            )
        return list(data.label_names or class_label.names)
    if data.label_names:
        if len(set(data.label_names)) != len(data.label_names):
            raise DataError(f"data.label_names: names must be distinct, got {data.label_names}")
        return list(data.label_names)
    column = train[data.label_column]
    if task.name == "multi_label":
        values = {t for v in column for t in _multi_label_tokens(v, data.label_separator)}
    elif task.name == "token_classification":
        from finetune.task_ner import tag_order

        values = {str(t) for row in column for t in (row or [])}
        if len(values) < 2:
            raise DataError(f"data.label_column: column {data.label_column!r} has {len(values)} distinct tag(s) "
                            f"({sorted(values)}) in the train split; tagging needs at least 2")
        return tag_order(values)
    else:
        values = {v for v in column if v is not None}
    if len(values) < 2:
        raise DataError(
            f"data.label_column: column {data.label_column!r} has {len(values)} distinct label(s) "
            f"({sorted(map(str, values))}) in the train split; classification needs at least 2"
        )
    return _sorted_values(values)


def _label_index(label_names: list[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(label_names)}


def _class_id(value: Any, names: list[str], index: dict[str, int], by_position: bool) -> int | None:
    """The id of one label value: its name, or (when names were given or come from a ClassLabel) its position."""
    if isinstance(value, str) and value in index:
        return index[value]
    as_int = _as_int(value)
    if as_int is not None:
        if by_position:
            return as_int if 0 <= as_int < len(names) else None
        return index.get(str(as_int))
    return None


def encode_labels(
    ds: datasets.Dataset, data: DataSection, task: TaskDefinition, label_names: list[str] | None, split: str
) -> datasets.Dataset:
    """Add a `labels` column in the form the task's head expects, refusing values it cannot map."""
    column = data.label_column
    if task.name == "question_answering":  # answers are read from their column while tokenising
        return ds
    feature = ds.features[column]
    by_position = data.label_names is not None or isinstance(feature, datasets.ClassLabel) or isinstance(
        getattr(feature, "feature", None), datasets.ClassLabel
    )
    values = ds[column]
    bad: list[Any] = []
    if task.name in ("token_classification", "multiple_choice"):
        labels, bad = task.label_ids(values, label_names, by_position)
        new_feature = datasets.Sequence(datasets.Value("int64")) if task.name == "token_classification" else datasets.Value("int64")
    elif task.name == "regression":
        labels = []
        for v in values:
            try:
                labels.append(float(v))
            except (TypeError, ValueError):
                bad.append(v)
        new_feature = datasets.Value("float32")
    elif task.name == "multi_label":
        assert label_names is not None
        index = _label_index(label_names)
        labels = []
        for v in values:
            row = [0.0] * len(label_names)
            for token in _multi_label_tokens(v, data.label_separator):
                i = _class_id(token, label_names, index, by_position)
                if i is None:
                    bad.append(token)
                else:
                    row[i] = 1.0
            labels.append(row)
        new_feature = datasets.Sequence(datasets.Value("float32"))
    else:
        assert label_names is not None
        index = _label_index(label_names)
        labels = []
        for v in values:
            i = _class_id(v, label_names, index, by_position)
            if i is None:
                bad.append(v)
            labels.append(i)
        new_feature = datasets.ClassLabel(names=label_names)
    if bad:
        shown = sorted({str(b) for b in bad})[:10]
        allowed = ("a number" if task.name == "regression" else "a choice index 0, 1, ...") if label_names is None else f"one of {label_names}" + (
            f" or an id 0..{len(label_names) - 1}" if by_position else ""
        )
        raise DataError(
            f"data.label_column: {len(bad)} value(s) in column {column!r} of split {split!r} cannot be used as "
            f"{task.name} labels: {shown}; allowed: {allowed}"
        )
    ds = ds.add_column("labels", labels) if "labels" != column else ds.remove_columns(column).add_column("labels", labels)
    return ds.cast_column("labels", new_feature)


# ---------------------------------------------------------------------------------------------
# splits and tokenisation
# ---------------------------------------------------------------------------------------------


def make_splits(
    raw: datasets.DatasetDict, recipe: Recipe, task: TaskDefinition, label_names: list[str] | None
) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset | None]:
    """Train, evaluation and optional test splits, labelled; evaluation is carved from train if absent."""
    data, seed = recipe.data, recipe.training.seed
    train = encode_labels(raw[data.train_split], data, task, label_names, data.train_split)
    if data.eval_split in raw:
        evaluation = encode_labels(raw[data.eval_split], data, task, label_names, data.eval_split)
    else:
        stratify = "labels" if task.name == "classification" else None
        try:
            parts = train.train_test_split(test_size=data.validation_size, seed=seed, stratify_by_column=stratify)
        except ValueError:  # too few examples of a class to stratify: carve at random instead
            parts = train.train_test_split(test_size=data.validation_size, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    test = None
    if data.test_split:
        test = encode_labels(raw[data.test_split], data, task, label_names, data.test_split)
    if data.max_train_samples and data.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(data.max_train_samples))
    if data.max_eval_samples and data.max_eval_samples < len(evaluation):
        evaluation = evaluation.select(range(data.max_eval_samples))
    for name, split in (("train", train), ("evaluation", evaluation)):
        if len(split) == 0:
            raise DataError(f"data: the {name} split is empty")
    return train, evaluation, test


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how the tokenizer splits text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation and padding are per-call state the fast tokenizer remembers from its last
        # call; they do not change how text splits, so they stay out of the hash.
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        state = json.dumps(spec, sort_keys=True)
    else:
        state = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256((type(tokenizer).__name__ + state).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "finetune")) / "tokenized"


def tokenize_splits(
    splits: dict[str, datasets.Dataset], recipe: Recipe, task: TaskDefinition, tokenizer: Any,
    label_names: list[str] | None = None,
) -> tuple[dict[str, datasets.Dataset], bool]:
    """Tokenise every split once; later runs with the same data, tokenizer and settings load the cache."""
    data = recipe.data
    key_parts = {
        "splits": {name: split._fingerprint for name, split in splits.items()},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": recipe.model.max_length,
        "columns": task.columns(data),
        "task": task.name,
        "settings": recipe.task.model_dump(include={"label_all_tokens", "doc_stride", "long_inputs", "chunk_stride"}),
        "labels": label_names,
        "version": 2,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    target = cache_root() / key
    if (target / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(target))
        return {name: loaded[name] for name in splits}, True

    settings = TaskSettings.from_dict(recipe.task.model_dump())
    tokenized = {}
    for name, split in splits.items():
        ctx = FeatureContext(data, tokenizer, recipe.model.max_length, settings, label_names, train=name == "train")
        tokenized[name] = split.map(
            task.features,
            fn_kwargs={"ctx": ctx},
            batched=True,
            with_indices=True,
            remove_columns=[c for c in split.column_names if c not in task.keep_raw_columns],
            desc=f"tokenising {name}",
            load_from_cache_file=False,
        )
    # Written to a temporary folder then renamed, so an interrupted run never leaves half a cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
    datasets.DatasetDict(tokenized).save_to_disk(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another process wrote the same cache first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    loaded = datasets.load_from_disk(str(target))
    return {name: loaded[name] for name in splits}, False


def load_splits(
    recipe: Recipe, task: TaskDefinition
) -> tuple[list[str] | None, datasets.Dataset, datasets.Dataset, datasets.Dataset | None]:
    """Load, check and label the recipe's data: (label names, train, evaluation, test or None), untokenised."""
    raw = load_raw(recipe.data)
    check_columns(raw, recipe.data, task)
    label_names = resolve_label_names(raw[recipe.data.train_split], recipe.data, task)
    return (label_names, *make_splits(raw, recipe, task, label_names))


def prepare(recipe: Recipe, task: TaskDefinition, tokenizer: Any) -> PreparedData:
    """Load, check, label, split and tokenise the recipe's data."""
    label_names, train, evaluation, test = load_splits(recipe, task)
    splits = {"train": train, "eval": evaluation} | ({"test": test} if test is not None else {})
    tokenized, hit = tokenize_splits(splits, recipe, task, tokenizer, label_names)

    def model_columns(ds: datasets.Dataset | None) -> datasets.Dataset | None:
        extra = [c for c in task.eval_only_columns if ds is not None and c in ds.column_names]
        return ds.remove_columns(extra) if extra else ds

    return PreparedData(
        train=tokenized["train"],
        eval=model_columns(tokenized["eval"]),
        test=model_columns(tokenized.get("test")),
        label_names=label_names,
        raw_train=train,
        raw_eval=evaluation,
        cache_hit=hit,
        eval_features=tokenized["eval"],
        test_features=tokenized.get("test"),
        raw_test=test,
    )


def length_stats(split: datasets.Dataset, recipe: Recipe, task: TaskDefinition, tokenizer: Any, limit: int = 20000) -> dict[str, Any]:
    """Token-length percentiles before truncation, and the share of examples longer than max_length."""
    data = recipe.data
    sample = split if len(split) <= limit else split.shuffle(seed=recipe.training.seed).select(range(limit))
    rows = sample[:]
    lengths = np.array(task.token_lengths(rows, data, tokenizer))
    pct = np.percentile(lengths, [50, 90, 95, 99]).round().astype(int).tolist()
    extra: dict[str, Any] = {}
    if recipe.task.long_inputs == "chunk":
        limit, step = recipe.model.max_length, max(1, recipe.model.max_length - 2 - recipe.task.chunk_stride)
        windows = 1 + np.maximum(0, -(-(lengths - limit) // step))
        extra = {"multi_window_share": float((windows > 1).mean()), "windows_max": int(windows.max())}
    elif task.name == "question_answering":
        questions = [len(ids) for ids in tokenizer(rows[data.question_column], add_special_tokens=False)["input_ids"]]
        windows = np.array(task.windows_needed(lengths, recipe.model.max_length, recipe.task.doc_stride, questions))
        extra = {"multi_window_share": float((windows > 1).mean()), "windows_max": int(windows.max())}
    return extra | {
        "examples": int(len(lengths)),
        "p50": pct[0],
        "p90": pct[1],
        "p95": pct[2],
        "p99": pct[3],
        "max": int(lengths.max()),
        "truncated_share": 0.0 if extra else float((lengths > recipe.model.max_length).mean()),
    }


def label_counts(split: datasets.Dataset, task: TaskDefinition, label_names: list[str] | None) -> dict[str, Any]:
    """How many examples carry each label (regression: the value range; NER: entities per type)."""
    return task.label_counts(split, label_names)
