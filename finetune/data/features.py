"""Tokenised features of a recipe's splits, cached by content, and the token-length report `validate` prints.

The cache key holds everything that decides the features (the data's fingerprint, the tokenizer, the
max length, the task and its settings), so a rerun with the same inputs loads instead of tokenising.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from finetune.config.recipe import Recipe
from finetune.data.loading import load_splits
from finetune.tasks import FeatureContext, Task, TaskSettings

CACHE_ENV = "FINETUNE_CACHE_DIR"
LENGTH_SLICE = 1000  # rows tokenised at once for the length report


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


def cache_home() -> Path:
    """finetune's cache folder: FINETUNE_CACHE_DIR, default ~/.cache/finetune."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "finetune"))


def cache_root() -> Path:
    return cache_home() / "tokenized"


def tokenize_splits(
    splits: dict[str, datasets.Dataset], recipe: Recipe, task: Task, tokenizer: Any,
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
        "settings": recipe.task.model_dump(include={"label_all_tokens", "doc_stride", "long_inputs", "chunk_stride",
                                                    *task.feature_settings}),
        "labels": label_names,
        "version": 4,  # 3: words of token tasks cut by task.word_split and tokenised after a space; 4: texts in NFC
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    target = cache_root() / key
    if (target / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(target))
        return {name: loaded[name] for name in splits}, True

    settings = TaskSettings.of(recipe.task)
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




def prepare(recipe: Recipe, task: Task, tokenizer: Any) -> PreparedData:
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


def length_stats(split: datasets.Dataset, recipe: Recipe, task: Task, tokenizer: Any, limit: int = 20000) -> dict[str, Any]:
    """Token-length percentiles before truncation, and the share of examples longer than max_length (or, for
    inputs read in windows, the share needing more than one window)."""
    data = recipe.data
    sample = split if len(split) <= limit else split.shuffle(seed=recipe.training.seed).select(range(limit))
    # Tokenised a slice at a time: the untruncated encodings of 20,000 long texts, held at once as Python lists,
    # took about 1.4 GB; only their lengths are kept.
    settings = TaskSettings.of(recipe.task)
    lengths = np.array([n for start in range(0, len(sample), LENGTH_SLICE)
                        for n in task.token_lengths(sample[start:start + LENGTH_SLICE], data, tokenizer, settings)],
                       dtype=np.int64)
    rows = sample[:]
    pct = np.percentile(lengths, [50, 90, 95, 99]).round().astype(int).tolist()
    windows = task.window_stats(rows, lengths, data, tokenizer, recipe.model.max_length, settings)
    return (windows or {}) | {
        "examples": int(len(lengths)),
        "p50": pct[0],
        "p90": pct[1],
        "p95": pct[2],
        "p99": pct[3],
        "max": int(lengths.max()),
        "truncated_share": 0.0 if windows else float((lengths > recipe.model.max_length).mean()),
    }
