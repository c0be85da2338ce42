"""The data a trained model is evaluated on or scores: which columns hold what, and the labelled split.

Columns are named as in a recipe's data section. They default to the ones the model was trained with (the
recipe saved beside it or in its MLflow run), then a recipe's data section (`--recipe`), then the command
line. Reading reuses `finetune.data.loading`; labelling goes by the model's own label set, and rows whose
label the model never saw are counted and named (and left out when asked), not crashed on.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from finetune.config.recipe import DataSection, Recipe
from finetune.data.loading import FILE_FORMATS, load_raw, make_splits, with_labels
from finetune.errors import DataError
from finetune.files import RefusedDocument, load_yaml, read_text
from finetune.tasks import Task
from finetune.tasks.labels import as_int

# Data-section keys that say which column holds what: these carry over from the recipe a model was trained
# with. How files are read (format, quoting, headerless column names) belongs to the file and does not.
COLUMN_KEYS = ("text_column", "text_pair_column", "label_column", "question_column", "context_column",
               "answers_column", "choice_columns", "label_separator")
FILE_ENDINGS = (*FILE_FORMATS, ".conll")
FILE_SPLIT = "evaluation"
"""The split name a single data file is read as."""


def option_name(key: str) -> str:
    """The command-line option of a data-section key: data.text_column -> --text-column (data.text_column)."""
    bare = key.removeprefix("data.").split("[")[0]
    return f"--{bare.replace('_', '-')} ({key})"


def trained_columns(model_path: Path, run_id: str | None) -> dict[str, Any]:
    """The column keys of the recipe the model was trained with (empty when there is none to read).

    The recipe is read bounded (`finetune.files`): one too large, too deep or whose aliases expand too far is a
    DataError naming it, before it costs minutes or gigabytes; one that is not valid YAML gives no columns, as
    before (the defaults and the command line's options apply).
    """
    source, text = model_path / "recipe.yaml", None
    try:
        if source.is_file():
            text = read_text(source)
        elif run_id:
            import mlflow

            try:
                source = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/recipe.yaml"))
            except Exception:  # a run without it (logged elsewhere, or by an old version): the defaults apply
                source = None
            text = read_text(source) if source is not None else None
        values = load_yaml(text) if text else {}
    except RefusedDocument as e:
        if str(e).startswith("not valid YAML"):
            return {}
        raise DataError(f"{source}: the model's recipe is refused ({e})") from None
    section = (values.get("data") or {}) if isinstance(values, dict) else {}
    if not isinstance(section, dict):
        return {}
    return {k: section[k] for k in COLUMN_KEYS if k in section}


def is_file_source(source: str) -> bool:
    """Whether DATA names a local file (it exists, or has a data file's ending); anything else is a hub data set."""
    return Path(source).exists() or Path(source).suffix.lower() in FILE_ENDINGS


def data_section(source: str | None, recipe: Recipe | None, trained: dict[str, Any],
                 options: dict[str, Any]) -> DataSection:
    """The data section to read: `trained` columns, then the recipe's data section, then DATA, then `options`
    (command-line values; None means not given)."""
    values: dict[str, Any] = recipe.data.model_dump() if recipe is not None else dict(trained)
    if source is not None:
        values.pop("files", None)
        values.pop("dataset", None)
        values.pop("dataset_config", None)
        if is_file_source(source):
            if not Path(source).is_file():
                raise DataError(f"DATA: file not found: {source} (resolved to {Path(source).resolve()})")
            values["files"] = {FILE_SPLIT: str(source)}
        else:
            values["dataset"] = source
    values |= {k: v for k, v in options.items() if v is not None}
    try:
        return DataSection.model_validate(values)
    except Exception as e:  # pydantic's ValidationError: a value of the wrong kind on the command line
        raise DataError(f"data options: {e}") from None


@dataclass
class LabelledData:
    """One split with the model's label ids, what was left out and why, and where each row came from."""

    split: datasets.Dataset
    data: DataSection
    split_name: str
    source: str
    """For people and MLflow: the file, or hub data set and configuration."""
    rows: list[int]
    """Per example of `split`, its row in the data as read (0-based, header excluded)."""
    unknown: dict[str, int] = field(default_factory=dict)
    """Label values the model cannot score, with how many rows carry each."""
    skipped_rows: int = 0

    @property
    def name(self) -> str:
        """A short name of the data for run names and columns: the file name, or the hub set and split."""
        if self.data.files:
            files = self.data.files[self.split_name] if self.split_name in self.data.files else next(iter(self.data.files.values()))
            first = files if isinstance(files, str) else files[0]
            return Path(first).name + ("" if self.split_name == FILE_SPLIT else f":{self.split_name}")
        return f"{self.data.dataset}{'/' + self.data.dataset_config if self.data.dataset_config else ''}:{self.split_name}"


def source_of(data: DataSection) -> str:
    if data.files:
        return ", ".join(f"{k}: {v}" for k, v in data.files.items())
    return f"{data.dataset}" + (f" ({data.dataset_config})" if data.dataset_config else "")


def check_split_columns(split: datasets.Dataset, wanted: dict[str, str | None], split_name: str) -> None:
    """Every column the task reads is in the split; the message names the option and the columns found."""
    for key, column in wanted.items():
        if column is None:
            raise DataError(f"{option_name(key)}: this model needs it; name the column")
        if column not in split.column_names:
            raise DataError(f"{option_name(key)}: column {column!r} is not in {split_name!r}; "
                            f"columns found: {', '.join(split.column_names)}")


def read_labelled(data: DataSection, split_name: str, task: Task, label_names: list[str] | None,
                  skip_unknown: bool = False, recipe: Recipe | None = None) -> LabelledData:
    """The named split with a `labels` column in the model's label ids.

    With a recipe whose evaluation split is carved from train (no such split in the data), that split is
    carved as training carved it. Rows with labels the model never saw are refused with their count and
    values, or, with `skip_unknown`, left out and reported.
    """
    raw = load_raw(data)
    if split_name not in raw:
        if recipe is not None and split_name == recipe.data.eval_split and recipe.data.train_split in raw:
            check_split_columns(raw[recipe.data.train_split], task.columns(data), recipe.data.train_split)
            evaluation = make_splits(raw, recipe, task, label_names)[1]
            return LabelledData(evaluation, data, split_name, source_of(data), list(range(len(evaluation))))
        raise DataError(f"--split: no split {split_name!r} in {source_of(data)}; splits found: {', '.join(raw)}")
    split = raw[split_name]
    check_split_columns(split, task.columns(data), split_name)
    rows = list(range(len(split)))
    unknown: dict[str, int] = {}
    skipped = 0
    if "data.label_column" in task.columns(data):  # QA reads its answers while tokenising: nothing to map
        values, by_position = _label_values(split, data.label_column, label_names)
        encoding = task.encode_labels(values, label_names, by_position, data)
        if encoding.bad:
            bad_rows, counts = _rows_with_bad_labels(task, values, label_names, by_position, data)
            unknown = dict(counts.most_common())
            shown = ", ".join(f"{value!r} ({n})" for value, n in list(unknown.items())[:10])
            known = f"the model's labels: {', '.join(label_names)}" if label_names else f"allowed: {encoding.allowed}"
            if not skip_unknown:
                raise DataError(
                    f"{option_name('data.label_column')}: {len(bad_rows)} of {len(values)} rows of column "
                    f"{data.label_column!r} have labels the model never saw: {shown}"
                    f"{' ...' if len(unknown) > 10 else ''}; {known}. Pass --skip-unknown-labels to evaluate on "
                    f"the other {len(values) - len(bad_rows)} rows")
            keep = sorted(set(rows) - set(bad_rows))
            if not keep:
                raise DataError(f"{option_name('data.label_column')}: every row has labels the model never saw: {shown}; {known}")
            split, rows, skipped = split.select(keep), keep, len(bad_rows)
            values = [values[i] for i in keep]
            encoding = task.encode_labels(values, label_names, by_position, data)
        split = with_labels(split, data.label_column, encoding)
    if recipe is not None and split_name == recipe.data.eval_split and data.max_eval_samples \
            and data.max_eval_samples < len(split):  # as training capped its evaluation split
        split, rows = split.select(range(data.max_eval_samples)), rows[: data.max_eval_samples]
    return LabelledData(split, data, split_name, source_of(data), rows, unknown, skipped)


def _label_values(split: datasets.Dataset, column: str, label_names: list[str] | None) -> tuple[list[Any], bool]:
    """The label column's values, and whether integers in it are positions in the model's label list.

    A ClassLabel column is read as its class names (so a data set whose classes are in another order still maps
    by name), or by position when its names are not the model's. Otherwise integers are positions only when
    the model's labels are not themselves integers (a model trained on 1, 2, 5 reads 5 as the label "5").
    """
    feature = split.features[column]
    values = list(split[column])
    if isinstance(feature, datasets.ClassLabel):
        if label_names and set(feature.names) <= set(label_names):
            return [feature.names[v] if isinstance(v, int) and 0 <= v < feature.num_classes else v for v in values], False
        return values, True
    if isinstance(getattr(feature, "feature", None), datasets.ClassLabel):
        return values, True
    return values, bool(label_names) and not all(as_int(n) is not None for n in label_names)


def _rows_with_bad_labels(task: Task, values: list[Any], label_names: list[str] | None, by_position: bool,
                          data: DataSection) -> tuple[list[int], collections.Counter]:
    # Row by row, only when something did not map: the task's encoding is the one judge of what a label is.
    bad_rows, counts = [], collections.Counter()
    for i, value in enumerate(values):
        bad = task.encode_labels([value], label_names, by_position, data).bad
        if bad:
            bad_rows.append(i)
            counts.update(str(b) for b in bad)
    return bad_rows, counts
