"""The evaluation commands: `finetune evaluate`, `finetune label-issues`, and `finetune predict --input/--output`.

Kept apart from the other commands: each command adds its arguments here and runs from here, so
finetune/cli/__init__.py only registers and dispatches them.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from finetune.cli.options import add_threads_option
from finetune.errors import FinetuneError

MODEL_HELP = ("a model folder (runs/<name>/best, or a `finetune export` folder), an MLflow run id, or a runs:/ or "
              "models:/ URI (e.g. models:/sst2-sentiment@champion)")


def _column_options(parser: argparse.ArgumentParser, labels: bool) -> None:
    group = parser.add_argument_group("columns (as in a recipe's data section; default: the ones the model was "
                                      "trained with, then --recipe's)")
    group.add_argument("--text-column", help="data.text_column: the text (NER: the text or its word list; multiple choice: the context)")
    group.add_argument("--text-pair-column", help="data.text_pair_column: the second text of pair models (multiple choice: the start of every answer)")
    if labels:
        group.add_argument("--label-column", help="data.label_column: the gold label")
        group.add_argument("--answers-column", help="data.answers_column: QA gold answers, SQuAD style")
        group.add_argument("--label-separator", help="data.label_separator: multi-label labels in one string, e.g. ','")
    group.add_argument("--question-column", help="data.question_column (QA)")
    group.add_argument("--context-column", help="data.context_column (QA)")
    group.add_argument("--choice-columns", type=_names, help="data.choice_columns: comma-separated (multiple choice)")
    group.add_argument("--quoting", choices=["minimal", "none"], help="CSV/TSV quoting (none: quote characters are "
                                                                      "plain text, as in GLUE's TSVs)")
    group.add_argument("--column-names", type=_names, help="comma-separated names of the columns of a headerless CSV/TSV")
    group.add_argument("--encoding", type=_encoding,
                       help="data.encoding: text encoding of the csv, tsv, json(l), CoNLL or SQuAD file (default utf-8; "
                            "cp949 for what Korean Excel saves); what finetune writes is always UTF-8")


def _encoding(text: str) -> str:
    from finetune.config.recipe import text_encoding

    try:
        return text_encoding(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["auto", "torch", "onnx", "onnx-int8"], default=None,
                        help="what runs the model, as in finetune serve: auto (the default; ONNX Runtime for a folder "
                             "with model.onnx, else PyTorch; predict with TEXT arguments: torch), torch, or onnx and "
                             "onnx-int8 for a finetune export folder")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="PyTorch backend: fp32 (as evaluation scores) or bf16 autocast")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default 32)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `evaluate` and `label-issues`."""
    evaluate = sub.add_parser("evaluate", help="evaluate a trained model on labelled data, logged to MLflow")
    evaluate.add_argument("model", help=MODEL_HELP)
    evaluate.add_argument("data", nargs="?", help="a csv, tsv, json, jsonl, parquet, CoNLL or SQuAD file, or a hub "
                                                  "data set name (with --split); default: --recipe's data")
    evaluate.add_argument("--recipe", help="take the data section of this recipe (its files or hub set, columns, "
                                           "format; with no DATA, its splits)")
    evaluate.add_argument("--split", help="the split of a hub data set or of --recipe's data (default: validation, "
                                          "or the recipe's data.eval_split, carved from train as training carved it)")
    evaluate.add_argument("--dataset-config", help="hub data set configuration (e.g. sst2 for glue)")
    evaluate.add_argument("--format", choices=["auto", "conll", "squad"], help="how to read DATA (default: by its ending)")
    _column_options(evaluate, labels=True)
    evaluate.add_argument("--metric", action="append", default=[], metavar="SPEC",
                          help="also compute this Hugging Face `evaluate` metric: a hub name (online), a local module "
                               "path, or finetune:<task>; NAME[,config=C][,KEY=VALUE...], e.g. f1,average=macro. Hub "
                               "names and paths are Python scripts: they need --allow-metric-code")
    evaluate.add_argument("--allow-metric-code", action="store_true",
                          help="let --metric name hub metrics and local metric modules, whose Python scripts "
                               "evaluate.load imports and runs in this process (default: only finetune:<task>)")
    evaluate.add_argument("--find-label-issues", action="store_true",
                          help="rank the examples whose label the model most confidently disputes (cleanlab): "
                               "label_issues.csv")
    evaluate.add_argument("--skip-unknown-labels", action="store_true",
                          help="leave out (and report) rows whose labels the model never saw, instead of refusing")
    _model_options(evaluate)
    evaluate.add_argument("--output-dir", help="where the evaluation files go (default: runs/evaluations/<time>-<data>); "
                                               "new, empty or an earlier evaluation's")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="write into an --output-dir finetune did not make, replacing files of the same names "
                               "(never through a link)")
    evaluate.add_argument("--experiment", help="MLflow experiment of the evaluation run (default: the model's training "
                                               "run's, nested under it)")
    evaluate.add_argument("--no-log", action="store_true", help="do not log an MLflow run")
    add_threads_option(evaluate)
    evaluate.add_argument("--verbose", action="store_true",
                          help="also show the libraries' output (load reports, progress bars, MLflow's lines) here; "
                               "it is always in evaluate.log in the output folder")

    issues = sub.add_parser("label-issues", help="find label errors in a recipe's training data (K-fold out-of-fold "
                                                 "predictions, cleanlab)")
    issues.add_argument("recipe", help="recipe YAML file")
    issues.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides, e.g. training.num_epochs=1 data.max_train_samples=2000")
    issues.add_argument("--folds", type=int, default=5, help="cross-validation folds: K models are trained (default 5)")
    issues.add_argument("--output-dir", help="where label_issues.csv goes (default: OUTPUT_DIR-label-issues of the "
                                             "recipe); new, empty or an earlier label-issues run's")
    issues.add_argument("--overwrite", action="store_true",
                        help="write into an --output-dir finetune did not make, replacing files of the same names")
    issues.add_argument("--show", type=int, default=10, help="issues printed (default 10)")
    add_threads_option(issues)
    issues.add_argument("--verbose", action="store_true",
                        help="also show the libraries' output (the folds' training, MLflow's lines) here; it is "
                             "always in label-issues.log in the output folder")


def add_file_options(predict: argparse.ArgumentParser) -> None:
    """`finetune predict MODEL --input FILE --output FILE`."""
    files = predict.add_argument_group("whole files (instead of TEXT arguments)")
    files.add_argument("--input", help="csv, tsv, jsonl or parquet file to score, streamed")
    files.add_argument("--output", help="csv, tsv, jsonl or parquet file to write: the input's columns and pred_* "
                                        "columns, one row per input row, in order; an interrupted job resumes "
                                        "when run again")
    files.add_argument("--chunk-rows", type=int, default=2048, help="rows read, scored and written at a time (default 2048)")
    files.add_argument("--overwrite", action="store_true", help="replace OUTPUT (or an interrupted job's partial output)")
    _column_options(predict, labels=False)
    _model_options(predict)


def run(args: argparse.Namespace) -> int:
    """Dispatch one of this module's commands."""
    if args.command == "evaluate":
        return cmd_evaluate(args)
    if args.command == "label-issues":
        return cmd_label_issues(args)
    return cmd_predict_file(args)


def _options(args: argparse.Namespace, *names: str) -> dict:
    return {name: getattr(args, name, None) for name in names}


COLUMN_OPTIONS = ("text_column", "text_pair_column", "label_column", "question_column", "context_column",
                  "answers_column", "choice_columns", "label_separator", "quoting", "column_names", "format",
                  "dataset_config", "encoding")


def _load(args: argparse.Namespace, backend: str):
    from finetune.cli.console import quiet_model_loading
    from finetune.tracking.sources import load_predictor, locate

    quiet_model_loading()
    found = locate(args.model)
    predictor = load_predictor(found, backend=backend, precision=args.precision)
    if args.batch_size < 1:
        raise FinetuneError(f"--batch-size: {args.batch_size}; allowed: 1 or more")
    predictor.batch_size = args.batch_size
    return found, predictor


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`finetune evaluate`: our lines and one progress bar on the terminal, library output in evaluate.log."""
    import finetune.cli.console as console

    with console.command_output("evaluate", args.verbose) as log:
        out_dir = _evaluate(args, console)
    kept = console.publish_log(log, out_dir, "evaluate.log")
    print(f"log: {kept or log}")
    return 0


def _evaluate(args: argparse.Namespace, console) -> Path:
    from finetune.config.recipe import load_recipe
    from finetune.errors import EvaluationError
    from finetune.evaluation.data import FILE_SPLIT, data_section, read_labelled, trained_columns
    from finetune.evaluation.evaluate import check_evaluation_folder, run_evaluation
    from finetune.evaluation.extra_metrics import ExtraMetrics, check_specs

    if args.data is None and args.recipe is None:
        raise FinetuneError("give DATA (a file or a hub data set) or --recipe RECIPE (its data section)")
    refused = check_specs(args.metric, args.allow_metric_code)
    if refused:  # before the model loads
        raise EvaluationError("\n".join(refused))
    if args.output_dir:  # a folder that would be refused is refused before the model loads; the default is new
        check_evaluation_folder(args.output_dir, args.overwrite)
    found, predictor = _load(args, args.backend or "auto")
    task = predictor.task
    extra = ExtraMetrics(args.metric, task, allow_code=args.allow_metric_code) if args.metric else None
    recipe = load_recipe(args.recipe) if args.recipe else None
    if recipe is not None and recipe.task.type != task.name:
        raise FinetuneError(f"--recipe: {args.recipe} is a {recipe.task.type} recipe; the model is {task.name}")
    data = data_section(args.data, recipe, trained_columns(found.path, found.run_id), _options(args, *COLUMN_OPTIONS))
    if data.files and args.data is not None:
        split = FILE_SPLIT
    else:
        split = args.split or (recipe.data.eval_split if recipe is not None and args.data is None else "validation")
    labelled = read_labelled(data, split, task, predictor.info.label_names, args.skip_unknown_labels,
                             recipe if args.data is None else None)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", labelled.name).strip("-")[:60]
    out_dir = Path(args.output_dir or f"runs/evaluations/{time.strftime('%Y%m%d-%H%M%S')}-{slug}")
    if labelled.unknown:
        shown = ", ".join(f"{value!r} ({n})" for value, n in list(labelled.unknown.items())[:10])
        console.warn(f"left out {labelled.skipped_rows} rows with labels the model never saw: {shown}")
    report = run_evaluation(found, predictor, labelled, out_dir, extra, args.find_label_issues, args.experiment,
                            log=not args.no_log, params={"backend": predictor.runtime, "batch_size": args.batch_size,
                                                         "columns": {k: v for k, v in task.columns(data).items()}},
                            overwrite=args.overwrite, progress=console.terminal_stream())
    say = console.say
    say(f"{task.name} model {found.source} ({predictor.runtime}) on {labelled.name}: {len(labelled.split)} examples"
        f" in {report.seconds:.1f} s")
    say(", ".join(f"{k} {v:.4f}" for k, v in report.metrics.items() if k != "label_issues"))
    for table in report.tables:
        say(f"\n{table.stem.replace('_', ' ')}:\n{table.read_text().rstrip()}")
    if report.issues is not None:
        say(f"\nlabel issues: {len(report.issues)} of {len(labelled.split)} examples; the likeliest first "
            f"({report.issues_path}):")
        say(report.issues.head(10).to_string(index=False, max_colwidth=60))
    say(f"\nfiles: {out_dir}")
    if report.run_id:
        from finetune.tracking.tracker import tracking_uri

        say(f"MLflow: evaluation run {report.run_id} in {tracking_uri()}")
    return out_dir


def cmd_label_issues(args: argparse.Namespace) -> int:
    from finetune.config.recipe import load_recipe
    from finetune.training.crossval import label_issues

    import finetune.cli.console as console

    recipe = load_recipe(args.recipe, args.overrides)
    out_dir = Path(args.output_dir or f"{recipe.output_dir}-label-issues")
    with console.command_output("label-issues", args.verbose) as log:
        bar = None

        def on_fold(k: int, metrics: dict[str, float]) -> None:
            nonlocal bar
            if bar is None:
                bar = console.progress_bar(args.folds, "folds", "fold")
            if k >= 0:
                shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if name != "loss")
                console.say(f"fold {k + 1}/{args.folds}: {shown}")
                bar.update(1)

        try:
            report = label_issues(recipe, args.folds, out_dir, overwrite=args.overwrite, on_fold=on_fold)
        finally:
            if bar is not None:
                console.close_bar(bar)
        console.say(f"\nout-of-fold ({args.folds} folds, {report.examples} examples, {report.seconds:.0f} s): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in report.metrics.items()))
        console.say(f"label issues: {len(report.issues)} of {report.examples} examples; the likeliest first "
                    f"({report.issues_path}):")
        console.say(report.issues.head(args.show).to_string(index=False, max_colwidth=60))
        console.say(f"MLflow: run {report.run_id}")
    kept = console.publish_log(log, out_dir, "label-issues.log")
    print(f"log: {kept or log}")
    return 0


def cmd_predict_file(args: argparse.Namespace) -> int:
    from finetune.evaluation.data import data_section, trained_columns
    from finetune.evaluation.scoring import ScoreSettings, score_file

    if not (args.input and args.output):
        raise FinetuneError("give both --input FILE and --output FILE to score a file")
    if args.texts:
        raise FinetuneError("give TEXT arguments or --input/--output, not both")
    if args.chunk_rows < 1:
        raise FinetuneError(f"--chunk-rows: {args.chunk_rows}; allowed: 1 or more")
    found, predictor = _load(args, args.backend or "auto")
    options = _options(args, "text_column", "text_pair_column", "question_column", "context_column", "choice_columns")
    data = data_section(args.input, None, trained_columns(found.path, found.run_id), options)
    columns = {k: v for k, v in predictor.task.input_columns(data, predictor.info.text_pair).items()}
    settings = ScoreSettings(model=str(found.source), runtime=predictor.runtime, columns=columns,
                             quoting=args.quoting or "minimal", column_names=args.column_names,
                             encoding=args.encoding or "utf-8", chunk_rows=args.chunk_rows, batch_size=args.batch_size)
    report = score_file(predictor, Path(args.input), Path(args.output), data, settings, overwrite=args.overwrite)
    resumed = f", resumed at row {report.resumed_from}" if report.resumed_from else ""
    print(f"wrote {report.rows} rows to {report.output} ({report.rows_per_second:.1f} rows/s with {predictor.runtime}"
          f"{resumed}); {report.errors} rows the model could not read (their reason is in pred_error)")
    return 0
