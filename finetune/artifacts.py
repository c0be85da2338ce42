"""Human-facing files logged with each MLflow run: plots, per-class tables, predictions, a model card.

Every prediction here goes through the task definition (`predictions` for what metrics compare,
`postprocess` for names and scores), so these files show exactly what the served model answers.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # runs on headless training machines; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

from finetune.tasks import PostprocessOptions, TaskDefinition  # noqa: E402


def write_evaluation_artifacts(out_dir: Path, *, task: TaskDefinition, label_names: list[str] | None,
                               texts: list[str], pairs: list[str] | None, gold: np.ndarray, logits: np.ndarray,
                               threshold: float = 0.5) -> list[Path]:
    """Write the evaluation files for one split into `out_dir` and return the paths written.

    classification: confusion_matrix.png, per_class_metrics.csv/.md, predictions.csv;
    multi_label: per_class_metrics.csv/.md, predictions.csv; regression: predictions.csv, scatter.png.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gold = task.gold(np.asarray(gold))
    pred = task.predictions(logits, threshold)
    answers = task.postprocess(logits, label_names, PostprocessOptions(threshold=threshold))
    written = [_write_predictions(out_dir / "predictions.csv", task, label_names, texts, pairs, gold, pred, answers)]
    if task.name == "regression":
        written.append(_write_scatter(out_dir / "scatter.png", gold, pred))
        return written
    assert label_names is not None
    written += _write_per_class(out_dir, task, label_names, gold, pred)
    if task.name == "classification":
        written.append(_write_confusion(out_dir / "confusion_matrix.png", label_names, gold, pred))
    return written


def write_span_artifacts(out_dir: Path, *, task: TaskDefinition, recipe_data, raw, outputs, metrics: dict[str, float]) -> list[Path]:
    """Evaluation files of the span and choice tasks, mistakes first.

    token_classification: predictions.csv (words, gold and predicted tags) and per_entity_type.csv/.md;
    question_answering: predictions.csv (question, predicted answer, gold answers, exact match, F1);
    multiple_choice: predictions.csv (context, choices, gold, predicted, score).
    """
    from finetune.metrics import normalize_answer, squad_f1
    from finetune.tasks import softmax

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if task.name == "token_classification":
        words = [" ".join(map(str, row)) for row in raw[recipe_data.text_column]]
        frame = pd.DataFrame({"words": words[: len(outputs["gold"])],
                              "gold": [" ".join(t) for t in outputs["gold"]],
                              "predicted": [" ".join(t) for t in outputs["predicted"]]})
        frame["correct"] = frame["gold"] == frame["predicted"]
        frame = frame.sort_values("correct", kind="stable")
        kinds = sorted(k.removeprefix("f1_") for k in metrics if k.startswith("f1_"))
        table = pd.DataFrame([[k, metrics.get(f"precision_{k}", 0.0), metrics.get(f"recall_{k}", 0.0), metrics[f"f1_{k}"]]
                              for k in kinds] + [["all (micro)", metrics["precision"], metrics["recall"], metrics["f1"]]],
                             columns=["entity type", "precision", "recall", "f1"])
        table.to_csv(out_dir / "per_entity_type.csv", index=False, float_format="%.4f")
        (out_dir / "per_entity_type.md").write_text(_markdown_table(table))
        written += [out_dir / "per_entity_type.csv", out_dir / "per_entity_type.md"]
    elif task.name == "question_answering":
        frame = pd.DataFrame({"question": raw[recipe_data.question_column], "predicted": outputs["predicted"],
                              "gold": [" | ".join(g) for g in outputs["gold"]]})
        frame["exact_match"] = [max((normalize_answer(p) == normalize_answer(a) for a in g or [""]), default=False)
                                for p, g in zip(outputs["predicted"], outputs["gold"])]
        frame["f1"] = [max((squad_f1(p, a) for a in g or [""]), default=0.0) for p, g in zip(outputs["predicted"], outputs["gold"])]
        frame = frame.sort_values("f1", kind="stable")
    else:
        probs = softmax(np.asarray(outputs, dtype=np.float64))
        columns = recipe_data.choice_columns
        rows = raw[:]
        choices = [[str(c) for c in r] for r in rows[columns[0]]] if len(columns) == 1 else \
            [[str(rows[c][i]) for c in columns] for i in range(len(raw))]
        gold = [int(v) for v in rows[recipe_data.label_column]] if recipe_data.label_column in rows else list(raw["labels"])
        frame = pd.DataFrame({"context": rows[recipe_data.text_column], "choices": [" | ".join(c) for c in choices],
                              "gold": gold, "predicted": probs.argmax(axis=1), "score": probs.max(axis=1)})
        frame["correct"] = frame["gold"] == frame["predicted"]
        frame = frame.sort_values(["correct", "score"], ascending=[True, False], kind="stable")
    frame.to_csv(out_dir / "predictions.csv", index=False)
    return [out_dir / "predictions.csv", *written]


def _write_predictions(path, task, label_names, texts, pairs, gold, pred, answers) -> Path:
    frame = pd.DataFrame({"text": list(texts)})
    if pairs is not None:
        frame["text_pair"] = list(pairs)
    if task.name == "classification":
        frame["gold"] = [label_names[i] for i in gold]
        frame["predicted"] = [a["label"] for a in answers]
        frame["score"] = [a["score"] for a in answers]
        frame["correct"] = gold == pred
        order, ascending = ["correct", "score"], [True, False]
    elif task.name == "multi_label":
        frame["gold"] = [";".join(label_names[i] for i in np.flatnonzero(row)) for row in gold]
        frame["predicted"] = [";".join(a["labels"]) for a in answers]
        frame["score"] = [float(np.mean(a["label_scores"])) if a["labels"] else 0.0 for a in answers]
        # Exact match: a partly right label set still needs a look, so it sorts with the errors.
        frame["correct"] = (gold == pred).all(axis=1)
        order, ascending = ["correct", "score"], [True, False]
    else:
        frame["gold"] = gold
        frame["predicted"] = [a["value"] for a in answers]
        frame["score"] = None
        frame["correct"] = None
        frame["_error"] = np.abs(gold - pred)
        order, ascending = ["_error"], [False]
    # Errors first: the reader opens this file to see what the model gets wrong.
    frame = frame.sort_values(order, ascending=ascending, kind="stable")
    frame.drop(columns=["_error"], errors="ignore").to_csv(path, index=False)
    return path


def _write_per_class(out_dir: Path, task: TaskDefinition, label_names: list[str], gold, pred) -> list[Path]:
    ids = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=ids, zero_division=0)
    rows = [[name, p[i], r[i], f[i], int(s[i])] for i, name in enumerate(label_names)]
    # Micro averages only add information for multi-label; for single-label they equal accuracy.
    averages = ["micro", "macro", "weighted"] if task.name == "multi_label" else ["macro", "weighted"]
    for avg in averages:
        ap, ar, af, _ = precision_recall_fscore_support(gold, pred, labels=ids, average=avg, zero_division=0)
        rows.append([f"{avg} avg", ap, ar, af, int(s.sum())])
    table = pd.DataFrame(rows, columns=["label", "precision", "recall", "f1", "support"])
    csv_path, md_path = out_dir / "per_class_metrics.csv", out_dir / "per_class_metrics.md"
    table.to_csv(csv_path, index=False, float_format="%.4f")
    md_path.write_text(_markdown_table(table))
    return [csv_path, md_path]


def _markdown_table(frame: pd.DataFrame) -> str:
    # Hand-rolled because DataFrame.to_markdown needs the optional `tabulate` package.
    def cell(v) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _write_confusion(path: Path, label_names: list[str], gold, pred) -> Path:
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
    return _save(fig, path)


def _write_scatter(path: Path, gold, pred) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(gold, pred, s=12, alpha=0.6)
    if len(gold):
        lo, hi = float(min(gold.min(), pred.min())), float(max(gold.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="perfect")
        ax.legend()
    ax.set_xlabel("gold")
    ax.set_ylabel("predicted")
    ax.set_title("Gold vs predicted")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # long runs write many plots; open figures would leak memory
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
    return _save(fig, out_dir / "learning_curves.png")


def write_model_card(out_dir: Path, *, recipe_yaml: str, recipe_name: str, checkpoint: str, task: TaskDefinition,
                     label_names: list[str] | None, label_counts: dict[str, dict], metrics: dict[str, float],
                     test_metrics: dict[str, float], data_description: str) -> Path:
    """Write MODEL_CARD.md: model, task, data, labels, eval/test metrics, the resolved recipe, use and limits.

    `label_counts` maps split name to `finetune.data.label_counts` of that split (label -> count, or
    min/mean/max for regression).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(recipe_yaml) or {}
    max_length = (recipe.get("model") or {}).get("max_length", 128)
    lines = [f"# Model card: {recipe_name}", "",
             f"- **Base checkpoint:** `{checkpoint}`", f"- **Task:** {task.name}: {task.description}", "",
             "## Data", "", data_description.strip() or "_not described_", ""]
    if label_counts:
        splits = list(label_counts)
        keys = list(dict.fromkeys(k for counts in label_counts.values() for k in counts))
        counts = pd.DataFrame([[k] + [label_counts[s].get(k, "") for s in splits] for k in keys],
                              columns=["label" if task.has_label_names else "statistic"] + splits)
        lines += ["Label counts per split:" if task.has_label_names else "Gold values per split:", "",
                  _markdown_table(counts)]
    if label_names:
        lines += ["## Labels", "", ", ".join(f"`{n}`" for n in label_names), ""]
    lines += ["## Metrics", ""]
    for title, values in (("Evaluation", metrics), ("Test", test_metrics)):
        lines.append(f"### {title}\n")
        if values:
            lines.append(_markdown_table(pd.DataFrame(sorted(values.items()), columns=["metric", "value"])))
        else:
            lines.append("_not computed_\n")
    lines += ["## Recipe", "", "The full resolved recipe of this run:", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    lines += ["## Intended use", "",
              f"{task.description.capitalize()} of text like the training data described above. "
              "Check the metrics on your own data before relying on it.", ""]
    train = label_counts.get("train") or {}
    # Summed counts are the example count only when each example has exactly one label.
    size = f"{sum(train.values())} examples" if task.name == "classification" and train else "the training split above"
    label_limit = (["- The label set is fixed to the labels above; inputs outside it are forced into one of them."]
                   if label_names else [])
    lines += ["## Limitations", "",
              f"- Trained on {size}; performance on text from other domains is unknown.",
              *label_limit,
              f"- Inputs longer than {max_length} tokens are truncated; text beyond that is ignored.",
              "- Assumes the language of the training data (typically English); other languages are untested.",
              f"- Inherits the biases of the base checkpoint `{checkpoint}` and of its pretraining corpus.", ""]
    path = out_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
