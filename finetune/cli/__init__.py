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
from finetune.cli.serve_options import add_serve_arguments
from finetune.config.recipe import describe_fields, load_recipe, recipe_to_yaml
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

    validate = sub.add_parser(
        "validate", help="check a recipe, its checkpoint and its data without training",
        epilog=_fields_epilog(), formatter_class=fmt,
    )
    validate.add_argument("recipe", help="recipe YAML file")
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)

    predict = sub.add_parser("predict", help="predict with a trained model")
    predict.add_argument("model", help="a model folder (runs/<name>/best), an MLflow run id, or a runs:/ or models:/ URI")
    predict.add_argument("texts", nargs="*", metavar="TEXT", help="texts to predict for; pair models: two by two; QA and multiple choice: JSON objects")
    predict.add_argument("--json", action="store_true", help="print the full answers as JSON lines")
    evaluation_commands.add_file_options(predict)
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

    convert = sub.add_parser(
        "convert", help="turn a BERT or DistilBERT checkpoint into a long-context BigBird checkpoint (warm start)")
    convert.add_argument("source", help="a BERT-family checkpoint: a hub id or a folder, resolved like model.checkpoint")
    convert.add_argument("target", help="folder to write the BigBird checkpoint to (safetensors and tokenizer)")
    convert.add_argument("--to", choices=["bigbird"], required=True, help="the long-context architecture to convert to")
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

    ui = sub.add_parser("ui", help="start the MLflow UI on the tracking store, on loopback")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ui.add_argument("--port", type=int, default=5000)

    sub.add_parser("fields", help="list every recipe key with its type, default and meaning")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # MLflow may unpickle parts of models it loads; nothing finetune reads is a pickle, so it is never allowed.
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        if args.command == "fields":
            print(_fields_epilog())
            return 0
        if args.command == "run":
            return cmd_run(args.recipe, args.overrides, args.resume)
        if args.command == "compare":
            return cmd_compare(args.experiment, args.metric, args.format, args.evaluations)
        if args.command == "promote":
            return cmd_promote(args.run_id, args.name)
        if args.command == "sweep":
            from finetune.training.sweep import sweep

            sweep(args.recipe, args.overrides, args.grid, args.search, args.trials, args.storage, args.study_name)
            return 0
        if args.command == "serve":
            return cmd_serve(argv[argv.index("serve") + 1:])
        if args.command == "export":
            return cmd_export(args)
        if args.command == "convert":
            return cmd_convert(args)
        if args.command == "ui":
            return cmd_ui(args.host, args.port)
        if args.command == "validate":
            from finetune.cli.validate import validate

            return validate(args.recipe, args.overrides)
        if args.command in ("evaluate", "label-issues") or (args.command == "predict" and (args.input or args.output)):
            return evaluation_commands.run(args)
        if args.command == "predict":
            return cmd_predict(args.model, args.texts, args.json, args.backend or "torch", args.precision)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


def cmd_run(path: str, overrides: list[str], resume: bool = False) -> int:
    recipe = load_recipe(path, overrides)
    print(f"# resolved recipe ({path})\n{recipe_to_yaml(recipe)}")
    from finetune.training import train

    result = train.main(recipe, resume_run=resume)
    return 3 if result.tracking_problem else 0  # trained, but the MLflow record is incomplete


def _use_tracking_store() -> str:
    import mlflow

    from finetune.tracking.tracker import tracking_uri

    uri = tracking_uri()
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
        report = export_onnx(model_folder(args.model, Path(tmp)), args.target, args.quantize, check=not args.no_check,
                             source=args.model)
    print(json.dumps(report, indent=2))
    return 0


def cmd_serve(argv: list[str]) -> int:
    """`finetune serve` is the `serving` package's (`python -m serving`): this process becomes it, so signals and
    the exit status are the server's, and finetune itself never imports serving (serving builds on finetune)."""
    os.execv(sys.executable, [sys.executable, "-m", "serving", *argv])
    return 1  # not reached: execv replaces this process


def cmd_convert(args: argparse.Namespace) -> int:
    """Warm-start a BigBird checkpoint from a BERT-family one and print the conversion report."""
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


def cmd_ui(host: str, port: int) -> int:
    import subprocess

    uri = _use_tracking_store()
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding the MLflow UI to {host} exposes it beyond this machine", file=sys.stderr)
    print(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def cmd_predict(source: str, texts: list[str], as_json: bool, backend: str = "torch", precision: str = "fp32") -> int:
    from finetune.tasks import PostprocessOptions
    from finetune.tracking.sources import load_predictor, locate

    if not texts:
        raise InputError(0, "give TEXT arguments to predict for, or --input FILE --output FILE to score a file")
    predictor = load_predictor(locate(source), backend=backend, precision=precision)
    task = predictor.task
    try:
        inputs = task.inputs_from_cli(texts, predictor.info.text_pair)
        answers = predictor.predict(inputs, PostprocessOptions(threshold=predictor.info.threshold))
    except InputError as e:
        raise InputError(e.index, f"input {e.index + 1}: {e}") from None
    for item, answer in zip(inputs, answers):
        print(json.dumps({"input": item, **answer}) if as_json else task.format_answer(item, answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
