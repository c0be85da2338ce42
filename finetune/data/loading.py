"""Loading, checking, labelling and splitting the data a recipe names.

Everything here uses `datasets`; what it adds is the checks (with messages naming the column and the
values found), a stable label order and the carved validation split. How a label value becomes an id is
the task's (`Task.label_names_from`, `Task.encode_labels`); tokenising is in `finetune.data.features`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import datasets

from finetune.config.recipe import DataSection, Recipe
from finetune.data.readers import FormatError, decoding_problem, reading_encoding, rows_from_files
from finetune.errors import DataError
from finetune.tasks import LabelEncoding, Task, get_task

log = logging.getLogger(__name__)

# File endings -> (datasets builder, extra builder arguments).
FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),  # one text per line, in a column `text` (unlabelled text for masked_lm)
}

# ---------------------------------------------------------------------------------------------
# raw loading
# ---------------------------------------------------------------------------------------------


def load_raw(data: DataSection) -> datasets.DatasetDict:
    """Load every split the recipe names, from the hub, from local files, or (data.texts_from) another recipe's texts."""
    if data.texts_from is not None:
        return recipe_texts(data.texts_from, data.text_column, data.train_split)
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
    check_files(data)
    files = _file_lists(data)
    reader = data.format
    if reader == "auto" and all(Path(n).suffix.lower() == ".conll" for names in files.values() for n in names):
        reader = "conll"
    if reader != "auto":
        return _read_with(reader, files, data.encoding)
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
    if builder in ("csv", "json", "text"):
        # utf-8-sig also for JSON: with plain utf-8 the json builder hands the bytes to pyarrow, which stores invalid
        # UTF-8 (a CP949 file) without a word and fails only when a row is read; any other name makes it decode
        # each block strictly (and skip a byte-order mark) first.
        kwargs["encoding"] = reading_encoding(data.encoding)
    resolved = {split: [str(Path(p).resolve()) for p in names] for split, names in files.items()}
    try:
        return datasets.load_dataset(builder, data_files=resolved, **kwargs)
    except Exception:
        refuse_undecodable(files, data.encoding)
        raise


def refuse_undecodable(files: dict[str, list[str]], encoding: str) -> None:
    """After a failed load: raise DataError naming every file that `encoding` cannot decode (file, line, byte, and
    the encoding that would), so a CP949 file read as UTF-8 says so instead of showing a reader's traceback. The
    files are scanned only once a load has failed, so a good load costs nothing more."""
    problems = [problem for split, names in files.items() for name in names if Path(name).suffix.lower() != ".parquet"
                and (problem := decoding_problem(name, encoding, "data.encoding"))]
    if problems:
        raise DataError(*problems)


# Recipe keys of columns that hold targets, not text to pretrain on.
_TARGET_KEYS = ("data.label_column", "data.answers_column")


def recipe_texts(path: str, column: str, split: str) -> datasets.DatasetDict:
    """The training texts of another recipe as one split with a single text column (task-adaptive pretraining).

    Every text column its task reads is taken (texts, second texts, questions, contexts, endings; a word list is
    joined with spaces), from its whole train split; empty and repeated texts (a QA context asked about five
    times) are dropped, keeping the first.
    """
    from finetune.config.recipe import load_recipe
    from finetune.errors import RecipeError

    where = Path(path)
    if not where.is_file():
        raise DataError(f"data.texts_from: recipe file not found: {path} (resolved to {where.resolve()})")
    try:
        other = load_recipe(where)
    except RecipeError as e:
        raise DataError(f"data.texts_from: {e}") from None
    if other.data.texts_from is not None:
        raise DataError(f"data.texts_from: {path} takes its texts from another recipe itself; name that one")
    task = get_task(other.task.type)
    raw = load_raw(other.data)
    check_columns(raw, other.data, task)
    rows = raw[other.data.train_split]
    columns = [name for key, name in task.columns(other.data).items() if key not in _TARGET_KEYS]
    texts: dict[str, None] = {}
    for name in columns:
        for value in rows[name]:
            if isinstance(value, (list, tuple)):
                value = " ".join(str(v) for v in value)
            text = "" if value is None else str(value).strip()
            if text:
                texts.setdefault(text, None)
    if not texts:
        raise DataError(f"data.texts_from: {path} has no text in columns {', '.join(columns)} of its "
                        f"{other.data.train_split!r} split")
    return datasets.DatasetDict({split: datasets.Dataset.from_dict({column: list(texts)})})


def _file_lists(data: DataSection) -> dict[str, list[str]]:
    return {split: [names] if isinstance(names, str) else list(names) for split, names in (data.files or {}).items()}


def missing_files(data: DataSection) -> list[str]:
    """One message per data file the recipe names that is not there (every one of them, not only the first)."""
    problems = []
    for split, names in _file_lists(data).items():
        if not names:
            problems.append(f"data.files.{split}: no files given")
        for name in names:
            if not Path(name).is_file():
                problems.append(f"data.files.{split}: file not found: {name} (resolved to {Path(name).resolve()})")
    return problems


def check_files(data: DataSection) -> None:
    """Refuse a recipe whose data files are not all there, naming each missing one (cheap: run it before anything)."""
    problems = missing_files(data)
    if problems:
        raise DataError(*problems)


def _read_with(reader: str, files: dict[str, list[str]], encoding: str = "utf-8") -> datasets.DatasetDict:
    """CoNLL or SQuAD files, one Dataset per split."""
    splits = {}
    for split, names in files.items():
        paths = [str(Path(n).resolve()) for n in names]
        stamps = [(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
        try:
            # from_generator keys its cache on these arguments, so edited files are read again.
            splits[split] = datasets.Dataset.from_generator(
                rows_from_files, gen_kwargs={"reader": reader, "paths": paths, "stamps": stamps, "encoding": encoding},
                split=split)
        except FormatError as e:
            raise DataError(f"data.files.{split}: {e}") from None
        except Exception as e:  # datasets wraps generator errors in its own type
            cause = e.__cause__ or e.__context__
            if isinstance(cause, FormatError):
                raise DataError(f"data.files.{split}: {cause}") from None
            refuse_undecodable({split: names}, encoding)
            raise
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------
# checks and labels
# ---------------------------------------------------------------------------------------------


def check_columns(raw: datasets.DatasetDict, data: DataSection, task: Task) -> None:
    """Every split used must have the columns the recipe names for its task; every gap is named at once."""
    problems = []
    for key, column in task.columns(data).items():
        lacking = [name for name, split in raw.items() if column not in split.column_names]
        if lacking:
            # One problem per column: the splits usually share their columns, so the first one's list says it all.
            others = f" (nor in split {', '.join(repr(n) for n in lacking[1:])})" if len(lacking) > 1 else ""
            problems.append(f"{key}: column {column!r} is not in split {lacking[0]!r}; "
                            f"columns found: {', '.join(raw[lacking[0]].column_names)}{others}")
    if data.train_split not in raw:
        problems.append(f"data.train_split: no split {data.train_split!r}; splits found: {', '.join(raw)}")
    if data.test_split and data.test_split not in raw:
        problems.append(f"data.test_split: no split {data.test_split!r}; splits found: {', '.join(raw)}")
    if problems:
        raise DataError(*problems)


def resolve_label_names(train: datasets.Dataset, data: DataSection, task: Task) -> list[str] | None:
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
    try:
        return task.label_names_from(train[data.label_column], data)
    except ValueError as e:
        raise DataError(str(e)) from None


def encode_labels(ds: datasets.Dataset, data: DataSection, task: Task, label_names: list[str] | None,
                  split: str) -> datasets.Dataset:
    """Add a `labels` column in the form the task's loss reads, refusing values it cannot map."""
    column = data.label_column
    if "data.label_column" not in task.columns(data):  # the task reads its targets while tokenising (QA answers)
        return ds
    feature = ds.features[column]
    by_position = data.label_names is not None or isinstance(feature, datasets.ClassLabel) or isinstance(
        getattr(feature, "feature", None), datasets.ClassLabel
    )
    encoding = task.encode_labels(ds[column], label_names, by_position, data)
    if encoding.bad:
        shown = sorted({str(b) for b in encoding.bad})[:10]
        raise DataError(
            f"data.label_column: {len(encoding.bad)} value(s) in column {column!r} of split {split!r} cannot be used as "
            f"{task.name} labels: {shown}; allowed: {encoding.allowed}"
        )
    return with_labels(ds, column, encoding)


def with_labels(ds: datasets.Dataset, column: str, encoding: LabelEncoding) -> datasets.Dataset:
    """The split with the encoded labels as its `labels` column (replacing the label column if it has that name)."""
    ds = ds.remove_columns(column) if column == "labels" else ds
    return ds.add_column("labels", encoding.labels).cast_column("labels", encoding.feature)


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------


def make_splits(
    raw: datasets.DatasetDict, recipe: Recipe, task: Task, label_names: list[str] | None
) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset | None]:
    """Train, evaluation and optional test splits, labelled; evaluation is carved from train if absent."""
    data, seed = recipe.data, recipe.training.seed
    train = encode_labels(raw[data.train_split], data, task, label_names, data.train_split)
    if data.eval_split in raw:
        evaluation = encode_labels(raw[data.eval_split], data, task, label_names, data.eval_split)
    else:
        stratify = "labels" if task.stratify else None
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
    if data.max_train_samples_per_class:
        train = sample_per_class(train, data.max_train_samples_per_class, seed, task, label_names)
    train = with_label_examples(train, recipe, task, label_names)
    if data.max_eval_samples and data.max_eval_samples < len(evaluation):
        evaluation = evaluation.select(range(data.max_eval_samples))
    for name, split in (("train", train), ("evaluation", evaluation)):
        if len(split) == 0:
            raise DataError(f"data: the {name} split is empty")
    return train, evaluation, test


def sample_per_class(train: datasets.Dataset, n: int, seed: int, task: Task,
                     label_names: list[str] | None) -> datasets.Dataset:
    """`data.max_train_samples_per_class`: N training examples of each class, drawn with the seed (the rule for
    multi_label is in the field's doc); a class with fewer is taken whole, with a warning naming it. The drawn rows
    keep their order in the split (the training loader shuffles). Written here: `datasets` samples whole splits only."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.asarray(train["labels"])
    names = list(label_names or [])
    if labels.ndim == 1:  # one class per example
        groups = [(names[c] if c < len(names) else str(c), np.flatnonzero(labels == c)) for c in range(len(names))]
        chosen = [rows if len(rows) <= n else rng.choice(rows, n, replace=False) for _, rows in groups]
        short = [(name, len(rows)) for name, rows in groups if len(rows) < n]
        picked = np.concatenate(chosen) if chosen else np.array([], dtype=np.int64)
    else:  # multi_label: rarest label first, until N drawn examples carry each label
        carriers = [(names[j], np.flatnonzero(labels[:, j] > 0)) for j in range(labels.shape[1])]
        carriers.append(("(no label)", np.flatnonzero(labels.sum(axis=1) == 0)))
        taken = np.zeros(len(labels), dtype=bool)
        short = []
        for name, rows in sorted(carriers, key=lambda c: len(c[1])):
            have = int(taken[rows].sum())
            free = rng.permutation(rows[~taken[rows]])
            taken[free[:max(0, n - have)]] = True
            if len(rows) < n and (len(rows) or name != "(no label)"):
                short.append((name, len(rows)))
        picked = np.flatnonzero(taken)
    for name, count in short:
        log.warning(f"data.max_train_samples_per_class: {n}: class {name!r} has only {count} training example(s); "
                    "all are used")
    return train.select(np.sort(picked).tolist())


def label_sentences(recipe: Recipe, label_names: list[str] | None) -> list[tuple[str, str]]:
    """`training.contrastive.label_template`'s training examples as (text, class name): label_examples of each class,
    the template with the class's name; none without a template, label names, or the contrastive method."""
    section = recipe.training.contrastive
    if recipe.training.method != "contrastive" or section.label_template is None or not label_names:
        return []
    # str.replace, not str.format: the template is the recipe's text and must not reach attribute lookups.
    return [(section.label_template.replace("{}", name), name) for name in label_names
            for _ in range(section.label_examples)]


def with_label_examples(train: datasets.Dataset, recipe: Recipe, task: Task,
                        label_names: list[str] | None) -> datasets.Dataset:
    """The training split with `label_sentences` as examples of their class (multi_label: of that label alone),
    added after any sampling per class (they are not drawn examples), never to the evaluation split."""
    sentences = label_sentences(recipe, label_names)
    if not sentences:
        return train
    encoding = task.encode_labels([name for _, name in sentences], label_names, False, recipe.data)
    # Every other column of the split (an id, the raw label) is empty in these rows: they come from no file's row.
    rows: dict[str, list[Any]] = {column: [None] * len(sentences) for column in train.column_names}
    rows[recipe.data.text_column] = [text for text, _ in sentences]
    rows["labels"] = encoding.labels
    added = datasets.Dataset.from_dict(rows, features=train.features)
    return datasets.concatenate_datasets([train, added])


def load_splits(
    recipe: Recipe, task: Task
) -> tuple[list[str] | None, datasets.Dataset, datasets.Dataset, datasets.Dataset | None]:
    """Load, check and label the recipe's data: (label names, train, evaluation, test or None), untokenised."""
    raw = load_raw(recipe.data)
    check_columns(raw, recipe.data, task)
    label_names = resolve_label_names(raw[recipe.data.train_split], recipe.data, task)
    return (label_names, *make_splits(raw, recipe, task, label_names))


