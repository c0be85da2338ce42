"""Label errors: the examples whose given label the model most confidently disputes, with cleanlab.

`cleanlab.filter.find_label_issues` (confident learning) decides which examples are likely mislabelled from
the given labels and the model's predicted probabilities, and ranks them by self-confidence (the probability
the model gives the given label, lowest first). The probabilities must come from a model that did not train
on those examples: a held-out set (`finetune evaluate --find-label-issues`) or out-of-fold predictions
(`finetune label-issues RECIPE --folds K`, finetune.training.crossval).

The files (label_issues.csv and .md) are written as finetune.files writes folders: never into a link or a
non-empty folder finetune did not make, never over a file it did not write, and the csv's text cells (the
examples' texts, label names) safe to open in a spreadsheet.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from finetune.errors import EvaluationError
from finetune.files import RefusedWrite, check_output_folder, publish_files, spreadsheet_frame, staging_folder

ISSUES_FILE = "label_issues.csv"
ISSUES_TABLE = "label_issues.md"
OUTPUT_OPTION = "--output-dir"


def rank_label_issues(given: np.ndarray, probs: np.ndarray, label_names: Sequence[str],
                      threshold: float = 0.5) -> pd.DataFrame:
    """One row per likely label error, the likeliest first: position, given and suggested label, scores.

    `given` holds class ids (one per example) or 0/1 rows (multi-label); `probs` the model's probability of
    every label per example (softmax or sigmoid). `label_quality` is cleanlab's label quality score (0-1, low:
    likely wrong); `given_probability` the model's probability of the given label (multi-label: the mean over
    the given labels).
    """
    from cleanlab.filter import find_label_issues

    given, probs = np.asarray(given), np.asarray(probs, dtype=np.float64)
    if len(given) != len(probs):
        raise ValueError(f"{len(given)} labels but {len(probs)} rows of probabilities")
    multi_label = given.ndim == 2
    names = list(label_names)
    if len(given) < 2:
        return _frame([], [], [], [], [], [])
    with warnings.catch_warnings():
        # cleanlab warns when a class has few examples; its estimates are still the best there are.
        warnings.simplefilter("ignore")
        if multi_label:
            from cleanlab.multilabel_classification import get_label_quality_scores

            lists = [list(np.flatnonzero(row)) for row in given]
            ranked = find_label_issues(labels=lists, pred_probs=probs, multi_label=True,
                                       return_indices_ranked_by="self_confidence")
            quality = get_label_quality_scores(lists, probs)
        else:
            from cleanlab.rank import get_label_quality_scores

            labels = given.astype(np.int64)
            ranked = find_label_issues(labels=labels, pred_probs=probs, return_indices_ranked_by="self_confidence")
            quality = get_label_quality_scores(labels, probs)
    ranked = [int(i) for i in ranked]
    if multi_label:
        given_names = [";".join(names[j] for j in np.flatnonzero(given[i])) for i in ranked]
        suggested = [";".join(names[j] for j in np.flatnonzero(probs[i] >= threshold)) for i in ranked]
        given_p = [float(probs[i][given[i] == 1].mean()) if given[i].any() else 0.0 for i in ranked]
        suggested_p = [float(probs[i][probs[i] >= threshold].mean()) if (probs[i] >= threshold).any() else 0.0
                       for i in ranked]
    else:
        given_names = [names[int(given[i])] for i in ranked]
        best = probs.argmax(axis=1)
        suggested = [names[int(best[i])] for i in ranked]
        given_p = [float(probs[i, int(given[i])]) for i in ranked]
        suggested_p = [float(probs[i, int(best[i])]) for i in ranked]
    return _frame(ranked, given_names, suggested, [float(quality[i]) for i in ranked], given_p, suggested_p)


def _frame(ranked, given, suggested, quality, given_p, suggested_p) -> pd.DataFrame:
    return pd.DataFrame({"position": ranked, "given_label": given, "suggested_label": suggested,
                         "label_quality": quality, "given_probability": given_p,
                         "suggested_probability": suggested_p})


def require_class_probabilities(task: Any) -> None:
    """Refuse, naming the tasks that can, a task whose models give no probability per class."""
    if not task.ranks_label_issues:
        from finetune.tasks import TASKS

        able = [name for name, t in TASKS.items() if t.ranks_label_issues]
        raise EvaluationError(f"label issues are found from a probability per class, which {task.name} models do not "
                              f"give; tasks that do: {', '.join(able)}")


def issues_table(task: Any, probs: np.ndarray, split: Any, data: Any, rows: Sequence[int], label_names: Sequence[str],
                 threshold: float, text_pair: bool) -> pd.DataFrame:
    """The ranked label issues of a labelled split from the model's probabilities (`Task.label_probabilities`),
    with each example's row in the data and its text columns."""
    require_class_probabilities(task)
    frame = rank_label_issues(np.asarray(split["labels"]), probs, label_names, threshold)
    positions = frame.pop("position").tolist()
    texts = {column: split[column] for column in task.input_columns(data, text_pair).values() if column}
    table = pd.DataFrame({"row": [rows[i] for i in positions]})
    for column, values in texts.items():
        table[column] = [values[i] for i in positions]
    return pd.concat([table, frame], axis=1)


def issue_files(table: pd.DataFrame, folder: Path) -> list[Path]:
    """label_issues.csv (spreadsheet-safe) and label_issues.md (the likeliest 50) in a new folder of finetune's own
    (a staging folder: see `write_issues` for a user's folder)."""
    from finetune.reports.artifacts import markdown_table

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / ISSUES_FILE, folder / ISSUES_TABLE
    spreadsheet_frame(table).to_csv(csv_path, index=False, float_format="%.4f")
    md_path.write_text(markdown_table(table.head(50)))
    return [csv_path, md_path]


def check_issues_folder(out_dir: Path | str, overwrite: bool = False) -> None:
    """Refuse, naming it, a folder label issues must not be written to (a link, a file, a non-empty folder finetune
    did not make, unless `overwrite`): call it before the work that finds them."""
    try:
        check_output_folder(out_dir, OUTPUT_OPTION, overwrite)
    except RefusedWrite as e:
        raise EvaluationError(str(e)) from None


def write_issues(table: pd.DataFrame, out_dir: Path, overwrite: bool = False) -> Path:
    """label_issues.csv and label_issues.md into `out_dir` (new, empty or finetune's: `check_issues_folder`),
    written beside it and moved into place without following links; returns the csv's path."""
    out_dir = Path(out_dir)
    check_issues_folder(out_dir, overwrite)
    stage = staging_folder(out_dir)
    try:
        issue_files(table, stage)
        publish_files(stage, out_dir, "label-issues", OUTPUT_OPTION, overwrite)
    except RefusedWrite as e:
        raise EvaluationError(str(e)) from None
    finally:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
    return out_dir / ISSUES_FILE
