"""Files for a person, logged with each MLflow run: the pieces task definitions draw their evaluation files
with (per-class tables, confusion matrix, scatter plot, markdown tables), learning curves and the model card.

Which files a task writes, and from which predictions, is the task's (`Task.write_artifacts`), so these
files show exactly what the served model answers.

Every file here is written with finetune.files' `write_atomic` (beside its place, then renamed: a link planted at
the path is replaced, never written through, and a reader never sees half a file), and every csv's text cells
(labels, texts, predictions) go through `spreadsheet_frame`, so a label like `=HYPERLINK(...)` is text in a
spreadsheet, not a formula.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # runs on headless training machines; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

from finetune.files import RefusedDocument, load_yaml, spreadsheet_frame, write_atomic  # noqa: E402


def write_csv(path: Path, table: pd.DataFrame, **options: Any) -> Path:
    """A table as a csv file people open: spreadsheet-safe cells, written atomically, never through a link."""
    return write_atomic(path, spreadsheet_frame(table).to_csv(index=False, **options))


def write_per_class(out_dir: Path, label_names: list[str], gold, pred, averages: tuple[str, ...]) -> list[Path]:
    """per_class_metrics.csv and .md: precision, recall, F1 and support per label, then the `averages` rows."""
    ids = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=ids, zero_division=0)
    rows = [[name, p[i], r[i], f[i], int(s[i])] for i, name in enumerate(label_names)]
    for avg in averages:
        ap, ar, af, _ = precision_recall_fscore_support(gold, pred, labels=ids, average=avg, zero_division=0)
        rows.append([f"{avg} avg", ap, ar, af, int(s.sum())])
    table = pd.DataFrame(rows, columns=["label", "precision", "recall", "f1", "support"])
    return write_table(out_dir, "per_class_metrics", table)


def write_table(out_dir: Path, stem: str, table: pd.DataFrame) -> list[Path]:
    """A table as `stem`.csv (for tools) and `stem`.md (for a person reading the run in the MLflow UI)."""
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    write_csv(csv_path, table, float_format="%.4f")
    write_atomic(md_path, markdown_table(table))
    return [csv_path, md_path]


def write_predictions(path: Path, frame: pd.DataFrame, order: list[str], ascending: list[bool]) -> Path:
    """predictions.csv sorted so the rows worth a look (mistakes, the surest first) come first."""
    # Errors first: the reader opens this file to see what the model gets wrong.
    frame = frame.sort_values(order, ascending=ascending, kind="stable")
    return write_csv(path, frame.drop(columns=[c for c in frame.columns if c.startswith("_")]))


def markdown_table(frame: pd.DataFrame) -> str:
    # Hand-rolled because DataFrame.to_markdown needs the optional `tabulate` package.
    def cell(v) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_confusion_matrix(path: Path, label_names: list[str], gold, pred) -> Path:
    n = len(label_names)
    cm = confusion_matrix(gold, pred, labels=list(range(n)))
    # Grow the figure with the label count so ~30 labels keep legible ticks and cell counts.
    size = max(5.0, 0.5 * n + 2.5)
    fontsize = 10 if n <= 10 else 8 if n <= 20 else 7
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), label_names, rotation=45 if n <= 10 else 90, ha="right" if n <= 10 else "center",
                  fontsize=fontsize)
    ax.set_yticks(range(n), label_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title("Confusion matrix (counts)")
    dark = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=fontsize,
                    color="white" if cm[i, j] > dark else "black")
    return save_figure(fig, path)


def write_scatter(path: Path, gold, pred) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(gold, pred, s=12, alpha=0.6)
    if len(gold):
        lo, hi = float(min(gold.min(), pred.min())), float(max(gold.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="perfect")
        ax.legend()
    ax.set_xlabel("gold")
    ax.set_ylabel("predicted")
    ax.set_title("Gold vs predicted")
    return save_figure(fig, path)


def write_reliability_diagram(path: Path, report: Any, multi_label: bool) -> Path:
    """reliability_diagram.png: how often scores in each bin were right, before and after temperature scaling.

    `report` is a `finetune.tasks.calibration.CalibrationReport`; a perfectly calibrated model lies on the diagonal.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    what = "label score (sigmoid)" if multi_label else "top score (softmax)"
    for ax, bins, title, ece in ((axes[0], report.bins_before, "before (T = 1)", report.ece_before),
                                 (axes[1], report.bins_after, f"after (T = {report.temperature:.3g})", report.ece_after)):
        filled = [b for b in bins if b["count"]]
        width = bins[0]["high"] - bins[0]["low"]
        ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
               edgecolor="black", alpha=0.7, label="share right")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
        ax.scatter([b["confidence"] for b in filled], [b["accuracy"] for b in filled], s=10, color="black", zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(what)
        ax.set_title(f"{title}: ECE {ece:.3f}")
        ax.legend(loc="upper left")
    axes[0].set_ylabel("how often right")
    return save_figure(fig, path)


def calibration_lines(calibration: dict[str, Any] | None) -> list[str]:
    """The model card's calibration section: the temperature, and ECE and NLL before and after it."""
    if not calibration:
        return ["## Calibration", "", "_Scores are not calibrated (task.calibration: none, or not a classification "
                "or multi-label model)._", ""]
    how = "fitted" if calibration.get("fitted", True) else "given by the recipe (task.temperature) and measured"
    return ["## Calibration", "",
            f"Scores are softmax (or sigmoid) of the logits divided by a temperature T = {calibration['temperature']:.4g}, "
            f"{how} on the {calibration['examples']} evaluation examples. Expected calibration error (15 bins): "
            f"{calibration['ece_before']:.4f} before, {calibration['ece_after']:.4f} after; negative log-likelihood "
            f"{calibration['nll_before']:.4f} before, {calibration['nll_after']:.4f} after. An ECE of "
            f"{calibration['ece_after']:.3f} means a served score is, on average over the bins, that far from how often "
            "answers with that score were right. T was fitted on the same split that chose the best checkpoint, so "
            "on new data expect a somewhat larger error; `evaluation/reliability_diagram.png` shows it bin by bin."
            + _held_out_sentence(calibration) + _threshold_sentence(calibration), ""]


def _held_out_sentence(calibration: dict[str, Any]) -> str:
    """What the test split, which T was not fitted on, says of the calibrated scores."""
    if calibration.get("test_ece_after") is None:
        return " There was no test split to measure it on examples T was not fitted on."
    return (f" On the {calibration['test_examples']} test examples, which T was not fitted on, the expected "
            f"calibration error is {calibration['test_ece_before']:.4f} before and {calibration['test_ece_after']:.4f} after.")


def _threshold_sentence(calibration: dict[str, Any]) -> str:
    """Multi-label: where the threshold went, so a reader of calibrated scores knows the cut they are read with."""
    before, after = calibration.get("threshold"), calibration.get("served_threshold")
    if before is None or after is None or before == after:
        return ""
    return (f" Labels are predicted at a calibrated score of {after:.4g} or more: the same cut as the threshold "
            f"{before:.4g} on the uncalibrated scores evaluation used, so calibration changed the scores, not the labels.")


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    image = io.BytesIO()
    path = Path(path)
    try:
        fig.savefig(image, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)  # long runs write many plots; open figures would leak memory
    write_atomic(path, image.getvalue())
    return path


def write_learning_curves(out_dir: Path, history: dict[str, list[tuple[int, float]]], metric: str) -> Path:
    """Plot train loss (and eval loss) and the eval metric against step into learning_curves.png.

    `history` maps names such as 'train/loss' or 'eval/accuracy' to [(step, value), ...]; missing or
    empty series are drawn as "no data" so a run that never evaluated still gets a plot.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_key = metric if "/" in metric else f"eval/{metric}"
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, ylabel in ((loss_ax, ["train/loss", "eval/loss"], "loss"), (metric_ax, [metric_key], metric_key)):
        series = [(k, history.get(k) or []) for k in keys]
        for key, points in series:
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        if any(points for _, points in series):
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return save_figure(fig, out_dir / "learning_curves.png")


def write_model_card(out_dir: Path, *, recipe_yaml: str, recipe_name: str, checkpoint: str, task: Any,
                     label_names: list[str] | None, label_counts: dict[str, dict], metrics: dict[str, float],
                     test_metrics: dict[str, float], data_description: str, train_examples: int | None = None,
                     teacher: str | None = None, calibration: dict[str, Any] | None = None,
                     transfer: list[str] | None = None) -> Path:
    """Write MODEL_CARD.md: model, task, data, labels, eval/test metrics, the resolved recipe, use and limits.

    `label_counts` maps split name to the task's `label_counts` of that split (label -> count, or what
    describes its targets); `train_examples` is the number of training examples (texts, not windows);
    `teacher` the model it was distilled from, if any.
    `calibration` is the model's calibration report (ModelInfo.calibration), for tasks whose scores are calibrated;
    `transfer` are lines saying what the run started from and what it trained (parent model, freezing, adapter).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:  # the resolved recipe finetune wrote; bounded all the same, as every YAML finetune reads
        recipe = load_yaml(recipe_yaml) or {}
    except RefusedDocument:
        recipe = {}
    model_section = recipe.get("model") if isinstance(recipe, dict) else None
    max_length = (model_section if isinstance(model_section, dict) else {}).get("max_length", 128)
    lines = [f"# Model card: {recipe_name}", "",
             f"- **Base checkpoint:** `{checkpoint}`", f"- **Task:** {task.name}: {task.description}",
             *([f"- **Distilled from:** `{teacher}` (the teacher's outputs on the training data; the `distillation` "
                "section of the recipe below has the temperature and weights)"] if teacher else []),
             *[f"- {line}" for line in transfer or []], "",
             "## Data", "", data_description.strip() or "_not described_", ""]
    if label_counts:
        splits = list(label_counts)
        keys = list(dict.fromkeys(k for counts in label_counts.values() for k in counts))
        counts = pd.DataFrame([[k] + [label_counts[s].get(k, "") for s in splits] for k in keys],
                              columns=["label" if task.has_label_names else "statistic"] + splits)
        lines += ["Label counts per split:" if task.has_label_names else "Gold values per split:", "",
                  markdown_table(counts)]
    if label_names:
        lines += ["## Labels", "", ", ".join(f"`{n}`" for n in label_names), ""]
    lines += ["## Metrics", ""]
    for title, values in (("Evaluation", metrics), ("Test", test_metrics)):
        lines.append(f"### {title}\n")
        if values:
            lines.append(markdown_table(pd.DataFrame(sorted(values.items()), columns=["metric", "value"])))
        else:
            lines.append("_not computed_\n")
    if getattr(task, "calibrates", False):
        lines += calibration_lines(calibration)
    lines += ["## Recipe", "", "The full resolved recipe of this run:", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    use = (f"{task.description.capitalize()} of text like the training data described above. "
           "Check the metrics on your own data before relying on it.") if getattr(task, "serves", True) else (
        "A checkpoint to fine-tune (`model.checkpoint`) on text like the training data described above; it does not "
        "answer requests itself.")
    lines += ["## Intended use", "", use, ""]
    size = f"{train_examples} examples" if train_examples else "the training split above"
    label_limit = (["- The label set is fixed to the labels above; inputs outside it are forced into one of them."]
                   if label_names else [])
    lines += ["## Limitations", "",
              f"- Trained on {size}; performance on text from other domains is unknown.",
              *label_limit,
              *([f"- Inputs longer than {max_length} tokens are truncated; text beyond that is ignored."]
                if getattr(task, "serves", True) else []),
              "- Assumes the language of the training data (typically English); other languages are untested.",
              f"- Inherits the biases of the base checkpoint `{checkpoint}` and of its pretraining corpus.", ""]
    return write_atomic(out_dir / "MODEL_CARD.md", "\n".join(lines))
