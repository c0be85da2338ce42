"""The `finetune` command line: `build_parser` says what each command takes, `main` runs it.

Every failure the user can act on is a `FinetuneError`, printed as `error: <message>` with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from finetune.cli import evaluate as evaluation_commands
from finetune.cli.options import add_threads_option, apply_threads_option
from finetune.cli.serve_options import add_serve_arguments
from finetune.config.recipe import describe_fields, load_recipe
from finetune.errors import FinetuneError, InputError, RecipeError

OVERRIDES_HELP = "recipe overrides as dotted KEY=VALUE, typed by the schema (e.g. training.learning_rate=3e-5)"


def _fields_epilog() -> str:
    return "recipe keys (usable in the YAML and as KEY=VALUE overrides):\n" + "\n".join(describe_fields())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune BERT-family encoders from YAML recipes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    run = sub.add_parser("run", help="train a recipe and log it to MLflow", epilog=_fields_epilog(), formatter_class=fmt)
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint in output_dir/checkpoints, in the same MLflow run")
    run.add_argument("--overwrite", action="store_true",
                     help="use an output_dir that holds files finetune did not write (no .finetune-run.json): finetune "
                          "adopts it, replacing its best/ and checkpoints/step-N and leaving everything else alone")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also show the resolved recipe and the libraries' output (always in output_dir/run.log)")

    pretrain = sub.add_parser(
        "pretrain", help="continue pretraining a checkpoint with masked-language modelling (task.type: masked_lm)",
        epilog=_fields_epilog(), formatter_class=fmt)
    pretrain.add_argument("recipe", help="recipe YAML file with task.type: masked_lm")
    pretrain.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    pretrain.add_argument("--resume", action="store_true",
                          help="continue from the newest checkpoint in output_dir/checkpoints, in the same MLflow run")
    pretrain.add_argument("--overwrite", action="store_true",
                          help="use an output_dir that holds files finetune did not write (see finetune run --help)")
    pretrain.add_argument("-v", "--verbose", action="store_true",
                          help="also show the resolved recipe and the libraries' output (always in output_dir/run.log)")

    validate = sub.add_parser(
        "validate", help="check a recipe, its checkpoint and its data without training",
        epilog=_fields_epilog(), formatter_class=fmt,
    )
    validate.add_argument("recipe", help="recipe YAML file")
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    validate.add_argument("-v", "--verbose", action="store_true", help="also show the libraries' output")

    predict = sub.add_parser("predict", help="predict with a trained model")
    predict.add_argument("model", help="a model folder (runs/<name>/best), an MLflow run id, or a runs:/ or models:/ URI")
    predict.add_argument("texts", nargs="*", metavar="TEXT", help="texts to predict for; pair models: two by two; QA and multiple choice: JSON objects")
    predict.add_argument("--json", action="store_true", help="print the full answers as JSON lines")
    evaluation_commands.add_file_options(predict)
    add_threads_option(predict)
    evaluation_commands.add_commands(sub)

    compare = sub.add_parser("compare", help="compare finished runs, best first")
    compare.add_argument("--experiment", help="only this MLflow experiment (default: all)")
    compare.add_argument("--metric", help="sort on best/<METRIC> (default: the runs' task.metric_for_best)")
    compare.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    compare.add_argument("--evaluations", action="store_true",
                         help="one row per `finetune evaluate` run instead: model, data, split, metric")

    promote = sub.add_parser("promote", help="make a run's registered model the champion, whatever the scores")
    promote.add_argument("run_id")
    promote.add_argument("--name", help="registered model name (needed only if the run is registered under several)")

    sweep = sub.add_parser("sweep", help="run a grid or an Optuna search of a recipe as nested MLflow runs")
    sweep.add_argument("recipe")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="values to try for a key; several --grid give every combination")
    sweep.add_argument("--search", action="append", default=[], metavar="KEY=SPACE",
                       help="a search space for Optuna: float:LOW:HIGH, logfloat:LOW:HIGH, int:LOW:HIGH or choice:A,B")
    sweep.add_argument("--trials", type=int, default=10, help="Optuna trials (search mode)")
    sweep.add_argument("--storage", help="Optuna storage URL shared by several workers, e.g. sqlite:///optuna.db")
    sweep.add_argument("--study-name", help="Optuna study name (needed to share a study between workers)")

    serve = sub.add_parser("serve", help="serve a model over HTTP (default: the registry's champion)")
    add_serve_arguments(serve)

    export = sub.add_parser("export", help="export a trained model to ONNX Runtime, checked against PyTorch")
    export.add_argument("model", help="a trained model folder (runs/<name>/best), an MLflow run id, or a runs:/ or models:/ URI "
                                      "(e.g. models:/sst2-sentiment@champion)")
    export.add_argument("target", help="folder to write (the model folder plus model.onnx)")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--quantize", choices=["int8"], help="also write a dynamically quantized model.int8.onnx")
    export.add_argument("--no-check", action="store_true", help="skip the parity check on the recipe's evaluation data")
    add_threads_option(export)

    convert = sub.add_parser(
        "convert", help="turn a BERT or DistilBERT checkpoint into a long-context BigBird checkpoint (warm start), "
                        "keep some of its layers (a student to distil), or teach its vocabulary the pieces of your "
                        "texts (a new language or domain)")
    convert.add_argument("source", help="a checkpoint: a hub id or a folder, resolved like model.checkpoint")
    convert.add_argument("target", help="folder to write the new checkpoint to (safetensors and tokenizer)")
    convert.add_argument("--to", choices=["bigbird", "fewer-layers", "vocabulary"], required=True,
                         help="bigbird: a long-context BigBird; fewer-layers: only the layers named by --layers; "
                              "vocabulary: pieces learned from --texts added to the tokenizer, their embeddings "
                              "started from the old pieces (then `finetune pretrain` on the same texts)")
    convert.add_argument("--layers", help="fewer-layers: the layers to keep, e.g. 0,2,4 (renumbered 0, 1, 2 in this order)")
    convert.add_argument("--texts", action="append", metavar="FILE",
                         help="vocabulary: a UTF-8 text file, one text per line (repeat for more files)")
    convert.add_argument("--vocab-size", type=int, default=16000,
                         help="vocabulary: size of the vocabulary learned from the texts; its pieces the checkpoint "
                              "lacks are added (default 16000)")
    convert.add_argument("--min-frequency", type=int, default=2,
                         help="vocabulary: how often a piece must occur in the texts to be learned (default 2)")
    convert.add_argument("--max-length", type=int, default=4096,
                         help="positions of the new model; the 512 learned ones are tiled up to it (default 4096)")
    convert.add_argument("--attention-type", choices=["block_sparse", "original_full"], default="block_sparse",
                         help="the attention type saved in the config (default block_sparse)")
    convert.add_argument("--block-size", type=int, default=64, help="block size of sparse attention (default 64)")
    convert.add_argument("--num-random-blocks", type=int, default=3,
                         help="random blocks each query block attends to (default 3)")
    convert.add_argument("--tolerance", type=float, default=1e-4,
                         help="largest allowed difference from the source's hidden states on inputs it can read")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="accept a source whose weights exist only as pickle files (unpickling can run code)")
    convert.add_argument("--overwrite", action="store_true", help="replace TARGET if it exists")

    ui = sub.add_parser("ui", help="start the MLflow UI on the tracking store, on loopback (stops with SIGTERM or Ctrl-C)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--verbose", action="store_true",
                    help="also show the server's own output (MLflow's and uvicorn's lines) here; always in ui.log "
                         "in finetune's cache folder")

    runs = sub.add_parser("runs", help="list the output folders under runs/: size, state and MLflow run")
    runs.add_argument("root", nargs="?", default="runs", help="the folder holding output folders (default runs)")
    runs.add_argument("--format", choices=["table", "json"], default="table")

    clean = sub.add_parser("clean", help="delete what finetune wrote in output folders (nothing else)")
    clean.add_argument("paths", nargs="+", metavar="PATH",
                       help="output folders (runs/NAME), or a folder holding them (runs)")
    clean.add_argument("--resume-checkpoints", action="store_true",
                       help="delete only the resume checkpoints (checkpoints/step-N, superseded), keeping best/")
    clean.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")

    sub.add_parser("fields", help="list every recipe key with its type, default and meaning")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a list of positionals at the first flag, so `run R.yaml --verbose KEY=VALUE` leaves the
    # overrides after the flag over; they are overrides all the same.
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command != "serve" and getattr(args, "threads", None) is not None:  # serve reads its own options
        try:
            apply_threads_option(args.threads)
        except FinetuneError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    # MLflow may unpickle parts of models it loads; nothing finetune reads is a pickle, so it is never allowed.
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        if args.command == "fields":
            print(_fields_epilog())
            return 0
        if args.command == "run":
            return cmd_run(args.recipe, args.overrides, args.resume, args.overwrite, verbose=args.verbose)
        if args.command == "pretrain":
            return cmd_run(args.recipe, args.overrides, args.resume, args.overwrite, pretraining=True, verbose=args.verbose)
        if args.command == "runs":
            from finetune.cli.runs import cmd_runs

            return cmd_runs(args.root, args.format)
        if args.command == "clean":
            from finetune.cli.runs import cmd_clean

            return cmd_clean(args.paths, args.resume_checkpoints, args.dry_run)
        if args.command == "compare":
            return cmd_compare(args.experiment, args.metric, args.format, args.evaluations)
        if args.command == "promote":
            return cmd_promote(args.run_id, args.name)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "serve":
            return cmd_serve(argv[argv.index("serve") + 1:])
        if args.command == "export":
            return cmd_export(args)
        if args.command == "convert":
            return cmd_convert(args)
        if args.command == "ui":
            from finetune.cli.ui import run_ui

            return run_ui(args.host, args.port, args.verbose)
        if args.command == "validate":
            from finetune.cli.validate import validate

            return validate(args.recipe, args.overrides, args.verbose)
        if args.command in ("evaluate", "label-issues") or (args.command == "predict" and (args.input or args.output)):
            return evaluation_commands.run(args)
        if args.command == "predict":
            return cmd_predict(args.model, args.texts, args.json, args.backend or "torch", args.precision)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Ctrl-C is the user's choice, not a crash: one line (what was kept, if the command says), no traceback,
        # and the shell's usual status for it (128 + SIGINT).
        print(f"\n{str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    return 1


def cmd_run(path: str, overrides: list[str], resume: bool = False, overwrite: bool = False,
            pretraining: bool = False, verbose: bool = False) -> int:
    """Train, showing what a person needs (finetune.cli.console); library output goes to output_dir/run.log.

    `finetune pretrain` is the same loop, with a check that the recipe pretrains (a fine-tuning recipe given to
    `pretrain` by mistake would train a classifier while you wait for a pretrained checkpoint).
    """
    from finetune.cli import console
    from finetune.data.loading import check_files
    from finetune.tasks import get_task
    from finetune.training.outputs import check_output_dir

    recipe = load_recipe(path, overrides)
    if pretraining and get_task(recipe.task.type).serves:  # a served task is a fine-tuning one
        raise RecipeError(f"{path}: finetune pretrain trains task.type masked_lm, and this recipe's task is "
                          f"{recipe.task.type}; run it with `finetune run {path}`, or set task.type: masked_lm")
    check_files(recipe.data)  # every missing data file, before anything is printed or started
    check_output_dir(Path(recipe.output_dir), overwrite)  # before the log is opened in it: never a foreign folder
    # Under `accelerate launch` every process runs this; only the first one writes to the terminal.
    rank = int(os.environ.get("RANK", "0"))
    log_path = Path(recipe.output_dir) / (console.LOG_FILE if rank == 0 else f"run.rank{rank}.log")
    with console.capture(log_path, verbose, main=rank == 0) as captured:
        console.say(console.recipe_line(path, overrides, recipe))
        console.show_recipe(recipe, path, verbose)
        from finetune.training import train

        report = console.TerminalReport(log_path if captured is not None else None)
        result = train.main(recipe, resume_run=resume, overwrite=overwrite, report=report)
    return 3 if result.tracking_problem else 0  # trained, but the MLflow record is incomplete


def cmd_sweep(args: argparse.Namespace) -> int:
    """Each trial shows what `finetune run` shows; library output goes to output_dir/sweep.log."""
    from finetune.cli import console
    from finetune.data.loading import check_files
    from finetune.training.sweep import sweep

    base = load_recipe(args.recipe, args.overrides)
    check_files(base.data)
    log_path = Path(base.output_dir) / "sweep.log"
    with console.capture(log_path) as captured:
        report = console.TerminalReport(log_path if captured is not None else None)
        sweep(args.recipe, args.overrides, args.grid, args.search, args.trials, args.storage, args.study_name,
              report=report, say=console.say)
    return 0


def _use_tracking_store() -> str:
    """The tracking store of a read-only command: it must exist (they never create one)."""
    import mlflow

    from finetune.tracking.store import existing_store

    uri = existing_store()
    mlflow.set_tracking_uri(uri)
    return uri


def cmd_compare(experiment: str | None, metric: str | None, fmt: str, evaluations: bool = False) -> int:
    from finetune.tracking.compare import compare_table, evaluations_table, render

    _use_tracking_store()
    try:
        if evaluations:
            print(render(evaluations_table(experiment, metric), fmt))
            return 0
        frame, metric = compare_table(experiment, metric)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if fmt == "table" and not frame.empty:
        print(f"sorted on best/{metric}; champion = the registry's champion alias")
    print(render(frame, fmt))
    return 0


def cmd_promote(run_id: str, name: str | None) -> int:
    from finetune.tracking.registry import promote

    _use_tracking_store()
    try:
        done = promote(run_id, name)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    print(f"{done['name']} version {done['version']} is now champion (was: {done['previous'] or 'none'})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from finetune.export.onnx import export_onnx
    from finetune.tracking.sources import model_folder

    with tempfile.TemporaryDirectory(prefix="finetune-export-") as tmp:
        # An MLflow model is unpacked into a subfolder: the temporary folder itself is 0700, and the export copies
        # the unpacked folder's permissions to DST.
        report = export_onnx(model_folder(args.model, Path(tmp) / "model"), args.target, args.quantize,
                             check=not args.no_check, source=args.model)
    print(json.dumps(report, indent=2))
    return 0


def cmd_serve(argv: list[str]) -> int:
    """`finetune serve` is the `serving` package's (`python -m serving`): this process becomes it, so signals and
    the exit status are the server's, and finetune itself never imports serving (serving builds on finetune)."""
    os.execv(sys.executable, [sys.executable, "-m", "serving", *argv])
    return 1  # not reached: execv replaces this process


def cmd_convert(args: argparse.Namespace) -> int:
    """Warm-start a BigBird checkpoint from a BERT-family one, or keep some of its layers; print the report."""
    from finetune.errors import ConversionError

    if args.to == "fewer-layers":
        from finetune.models.layer_selection import parse_layers, select_layers

        if args.layers is None:
            raise ConversionError("--to fewer-layers needs --layers, the layers to keep, e.g. --layers 0,2,4")
        report = select_layers(args.source, args.target, parse_layers(args.layers), allow_pickle=args.allow_pickle,
                               overwrite=args.overwrite)
        print(json.dumps(report, indent=2))
        print(f"kept layers {','.join(map(str, report['layers_kept']))} of the {report['source_layers']} of "
              f"{report['source']}: {report['parameters']:,} of {report['source_parameters']:,} parameters. Use it as "
              f"model.checkpoint: {report['target']}", file=sys.stderr)
        return 0
    if args.to == "vocabulary":
        return _convert_vocabulary(args)
    if args.texts is not None:
        raise ConversionError("--texts is for --to vocabulary")
    if args.layers is not None:
        raise ConversionError("--layers is for --to fewer-layers; --to bigbird keeps every layer")
    from finetune.models.convert import convert_to_bigbird

    report = convert_to_bigbird(
        args.source, args.target, max_length=args.max_length, attention_type=args.attention_type,
        block_size=args.block_size, num_random_blocks=args.num_random_blocks, tolerance=args.tolerance,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite,
    )
    print(json.dumps(report, indent=2))
    print(f"converted {report['source']} ({report['source_type']}) to BigBird with {report['max_length']} positions in "
          f"{report['seconds']:.1f} s; with full attention on {report['parity_length']} tokens its hidden states differ "
          f"from the source's by at most {report['parity_max_abs_diff']:.2e}. Use it as model.checkpoint: {report['target']}",
          file=sys.stderr)
    return 0


def _convert_vocabulary(args: argparse.Namespace) -> int:
    from finetune.cli.console import quiet_model_loading
    from finetune.errors import ConversionError
    from finetune.models.vocabulary import adapt_vocabulary

    if not args.texts:
        raise ConversionError("--to vocabulary needs --texts FILE: the texts to learn pieces from, one per line")
    if args.layers is not None:
        raise ConversionError("--layers is for --to fewer-layers; --to vocabulary keeps every layer")
    quiet_model_loading()
    report = adapt_vocabulary(args.source, args.target, args.texts, vocab_size=args.vocab_size,
                              min_frequency=args.min_frequency, allow_pickle=args.allow_pickle,
                              overwrite=args.overwrite, progress=lambda line: print(line, file=sys.stderr))
    print(json.dumps(report, indent=2, ensure_ascii=False))
    before, after = report["before"], report["after"]
    print(f"added {report['pieces_added']:,} pieces to {report['source']}'s {report['tokenizer_model']} vocabulary "
          f"({report['vocab_size_before']:,} -> {report['vocab_size_after']:,}) in {report['seconds']:.1f} s: "
          f"{before['pieces_per_word']} -> {after['pieces_per_word']} pieces per word, [UNK] {before['unk_share']:.1%} "
          f"-> {after['unk_share']:.1%} on your texts; English tokenized as before in "
          f"{report['english_sentences_tokenized_as_before']} sentences. Next, pretrain it on the same texts "
          f"(finetune pretrain, model.checkpoint: {report['target']}), then fine-tune from that.", file=sys.stderr)
    return 0


def cmd_predict(source: str, texts: list[str], as_json: bool, backend: str = "torch", precision: str = "fp32") -> int:
    from finetune.cli.console import quiet_model_loading
    from finetune.tasks import PostprocessOptions
    from finetune.tracking.sources import load_predictor, locate

    if not texts:
        raise InputError(0, "give TEXT arguments to predict for, or --input FILE --output FILE to score a file")
    quiet_model_loading()
    predictor = load_predictor(locate(source), backend=backend, precision=precision)
    task = predictor.task
    try:
        inputs = task.inputs_from_cli(texts, predictor.info.text_pair)
        answers = predictor.predict(inputs, PostprocessOptions(threshold=predictor.info.threshold))
    except InputError as e:
        raise InputError(e.index, f"input {e.index + 1}: {e}") from None
    for item, answer in zip(inputs, answers):
        # ensure_ascii=False: Hangul (any non-Latin text) is printed as itself, not as \uXXXX escapes.
        print(json.dumps({"input": item, **answer}, ensure_ascii=False) if as_json else task.format_answer(item, answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
