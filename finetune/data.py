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

from finetune.recipe import DataSection, Recipe
from finetune.tasks import TaskDefinition

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
    builders = set()
    kwargs: dict[str, Any] = {}
    for split, name in data.files.items():
        path = Path(name)
        if not path.is_file():
            raise DataError(f"data.files.{split}: file not found: {name} (resolved to {path.resolve()})")
        suffix = path.suffix.lower()
        if suffix not in FILE_FORMATS:
            raise DataError(
                f"data.files.{split}: {name} has an unknown ending {suffix!r}; allowed: {', '.join(FILE_FORMATS)}"
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
    files = {split: str(Path(p).resolve()) for split, p in data.files.items()}
    return datasets.load_dataset(builder, data_files=files, **kwargs)


# ---------------------------------------------------------------------------------------------
# checks and labels
# ---------------------------------------------------------------------------------------------


def check_columns(raw: datasets.DatasetDict, data: DataSection) -> None:
    """Every split used must have the text, pair and label columns the recipe names."""
    wanted = {"data.text_column": data.text_column, "data.label_column": data.label_column}
    if data.text_pair_column:
        wanted["data.text_pair_column"] = data.text_pair_column
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
    feature = ds.features[column]
    by_position = data.label_names is not None or isinstance(feature, datasets.ClassLabel) or isinstance(
        getattr(feature, "feature", None), datasets.ClassLabel
    )
    values = ds[column]
    bad: list[Any] = []
    if task.name == "regression":
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
        allowed = "a number" if label_names is None else f"one of {label_names}" + (
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


def _texts(batch: dict[str, list], data: DataSection) -> tuple[list[str], list[str] | None]:
    texts = ["" if t is None else str(t) for t in batch[data.text_column]]
    pairs = None
    if data.text_pair_column:
        pairs = ["" if t is None else str(t) for t in batch[data.text_pair_column]]
    return texts, pairs


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
    splits: dict[str, datasets.Dataset], recipe: Recipe, task: TaskDefinition, tokenizer: Any
) -> tuple[dict[str, datasets.Dataset], bool]:
    """Tokenise every split once; later runs with the same data, tokenizer and settings load the cache."""
    data = recipe.data
    key_parts = {
        "splits": {name: split._fingerprint for name, split in splits.items()},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": recipe.model.max_length,
        "columns": [data.text_column, data.text_pair_column],
        "task": task.name,
        "version": 1,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    target = cache_root() / key
    if (target / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(target))
        return {name: loaded[name] for name in splits}, True

    def tokenize(batch: dict[str, list]) -> dict:
        texts, pairs = _texts(batch, data)
        return task.tokenize(tokenizer, texts, pairs, recipe.model.max_length)

    tokenized = {}
    for name, split in splits.items():
        keep = {"labels"}
        tokenized[name] = split.map(
            tokenize,
            batched=True,
            remove_columns=[c for c in split.column_names if c not in keep],
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
    check_columns(raw, recipe.data)
    label_names = resolve_label_names(raw[recipe.data.train_split], recipe.data, task)
    return (label_names, *make_splits(raw, recipe, task, label_names))


def prepare(recipe: Recipe, task: TaskDefinition, tokenizer: Any) -> PreparedData:
    """Load, check, label, split and tokenise the recipe's data."""
    label_names, train, evaluation, test = load_splits(recipe, task)
    splits = {"train": train, "eval": evaluation} | ({"test": test} if test is not None else {})
    tokenized, hit = tokenize_splits(splits, recipe, task, tokenizer)
    return PreparedData(
        train=tokenized["train"],
        eval=tokenized["eval"],
        test=tokenized.get("test"),
        label_names=label_names,
        raw_train=train,
        raw_eval=evaluation,
        cache_hit=hit,
    )


def length_stats(split: datasets.Dataset, recipe: Recipe, task: TaskDefinition, tokenizer: Any, limit: int = 20000) -> dict[str, Any]:
    """Token-length percentiles before truncation, and the share of examples longer than max_length."""
    data = recipe.data
    sample = split if len(split) <= limit else split.shuffle(seed=recipe.training.seed).select(range(limit))
    texts, pairs = _texts(sample[:], data)
    encoded = tokenizer(texts, pairs, truncation=False, verbose=False)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    pct = np.percentile(lengths, [50, 90, 95, 99]).round().astype(int).tolist()
    return {
        "examples": int(len(lengths)),
        "p50": pct[0],
        "p90": pct[1],
        "p95": pct[2],
        "p99": pct[3],
        "max": int(lengths.max()),
        "truncated_share": float((lengths > recipe.model.max_length).mean()),
    }


def label_counts(split: datasets.Dataset, task: TaskDefinition, label_names: list[str] | None) -> dict[str, Any]:
    """How many examples carry each label (regression: the value range)."""
    labels = split["labels"]
    if task.name == "regression":
        arr = np.asarray(labels, dtype=float)
        return {"min": float(arr.min()), "mean": float(arr.mean()), "max": float(arr.max())}
    assert label_names is not None
    if task.name == "multi_label":
        counts = np.asarray(labels).sum(axis=0).astype(int)
    else:
        counts = np.bincount(np.asarray(labels, dtype=int), minlength=len(label_names))
    return {name: int(c) for name, c in zip(label_names, counts)}
