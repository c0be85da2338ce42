"""The `finetune` command line: run, validate, predict, fields."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from finetune.recipe import RecipeError, describe_fields, load_recipe, recipe_to_yaml
from finetune.tasks import InputError

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
    predict.add_argument("texts", nargs="+", metavar="TEXT", help="texts to predict for; pair models: two by two; QA and multiple choice: JSON objects")
    predict.add_argument("--json", action="store_true", help="print the full answers as JSON lines")

    compare = sub.add_parser("compare", help="compare finished runs, best first")
    compare.add_argument("--experiment", help="only this MLflow experiment (default: all)")
    compare.add_argument("--metric", help="sort on best/<METRIC> (default: the runs' task.metric_for_best)")
    compare.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")

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
    from serving.cli import add_arguments as add_serve_arguments

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
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fields":
            print(_fields_epilog())
            return 0
        if args.command == "run":
            return cmd_run(args.recipe, args.overrides, args.resume)
        if args.command == "compare":
            return cmd_compare(args.experiment, args.metric, args.format)
        if args.command == "promote":
            return cmd_promote(args.run_id, args.name)
        if args.command == "sweep":
            from finetune.sweep import sweep

            sweep(args.recipe, args.overrides, args.grid, args.search, args.trials, args.storage, args.study_name)
            return 0
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "convert":
            return cmd_convert(args)
        if args.command == "ui":
            return cmd_ui(args.host, args.port)
        if args.command == "validate":
            from finetune.validate import validate

            return validate(args.recipe, args.overrides)
        if args.command == "predict":
            return cmd_predict(args.model, args.texts, args.json)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # known, user-facing failures carry their own message
        from finetune.checkpoints import CheckpointError
        from finetune.data import DataError
        from finetune.train import TrainingDiverged

        if isinstance(e, (CheckpointError, DataError, TrainingDiverged)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 1


def cmd_run(path: str, overrides: list[str], resume: bool = False) -> int:
    recipe = load_recipe(path, overrides)
    print(f"# resolved recipe ({path})\n{recipe_to_yaml(recipe)}")
    from finetune import train

    result = train.main(recipe, resume_run=resume)
    return 3 if result.tracking_problem else 0  # trained, but the MLflow record is incomplete


def _use_tracking_store() -> str:
    import mlflow

    from finetune.tracking import tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def cmd_compare(experiment: str | None, metric: str | None, fmt: str) -> int:
    from finetune.compare import compare_table, render

    _use_tracking_store()
    try:
        frame, metric = compare_table(experiment, metric)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if fmt == "table" and not frame.empty:
        print(f"sorted on best/{metric}; champion = the registry's champion alias")
    print(render(frame, fmt))
    return 0


def cmd_promote(run_id: str, name: str | None) -> int:
    from finetune.registry import promote

    _use_tracking_store()
    try:
        done = promote(run_id, name)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    print(f"{done['name']} version {done['version']} is now champion (was: {done['previous'] or 'none'})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from finetune.export import ExportError, export_onnx
    from serving.loading import ModelSourceError, model_folder

    with tempfile.TemporaryDirectory(prefix="finetune-export-") as tmp:
        try:
            report = export_onnx(model_folder(args.model, Path(tmp)), args.target, args.quantize, check=not args.no_check,
                                 source=args.model)
        except (ExportError, ModelSourceError) as e:
            raise RecipeError(str(e)) from None
    print(json.dumps(report, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.cli import serve

    return serve(args)


def cmd_convert(args: argparse.Namespace) -> int:
    """Warm-start a BigBird checkpoint from a BERT-family one and print the conversion report."""
    from finetune.convert import ConversionError, convert_to_bigbird

    try:
        report = convert_to_bigbird(
            args.source, args.target, max_length=args.max_length, attention_type=args.attention_type,
            block_size=args.block_size, num_random_blocks=args.num_random_blocks, tolerance=args.tolerance,
            allow_pickle=args.allow_pickle, overwrite=args.overwrite,
        )
    except ConversionError as e:
        raise RecipeError(str(e)) from None
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


def load_model(source: str) -> tuple[Any, Any]:
    """(model with .predict, its Predictor): a folder loads directly; run ids and MLflow URIs via mlflow.pyfunc."""
    from finetune.mlflow_model import FinetunePyfunc
    from finetune.modeling import Predictor

    if Path(source).is_dir():
        predictor = Predictor.from_dir(source)
        return FinetunePyfunc(predictor), predictor
    import mlflow

    from finetune.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    uri = f"runs:/{source}/model" if re.fullmatch(r"[0-9a-f]{32}", source) else source
    if not uri.startswith(("runs:/", "models:/")):
        raise RecipeError(f"model {source!r} is not a folder, a run id, or a runs:/ or models:/ URI")
    model = mlflow.pyfunc.load_model(uri)
    return model, model.get_raw_model()


def cmd_predict(source: str, texts: list[str], as_json: bool) -> int:
    model, predictor = load_model(source)
    inputs: list[Any] = list(texts)
    if predictor.info.task in ("question_answering", "multiple_choice"):
        try:  # structured inputs: one JSON object per argument
            inputs = [json.loads(t) for t in texts]
        except json.JSONDecodeError as e:
            example = json.dumps(predictor.task.example_input(predictor.info.text_pair))
            raise RecipeError(f"this model reads JSON objects such as '{example}': {e}") from None
    elif predictor.info.text_pair:
        if len(texts) % 2:
            raise RecipeError(f"this model reads sentence pairs: give texts two by two (got {len(texts)})")
        inputs = [[texts[i], texts[i + 1]] for i in range(0, len(texts), 2)]
    try:
        answers = model.predict(inputs)
    except InputError as e:
        raise RecipeError(f"input {e.index + 1}: {e}") from None
    for item, answer in zip(inputs, answers):
        if as_json:
            print(json.dumps({"input": item, **answer}))
        elif "label" in answer:
            print(f"{answer['label']}\t{answer['score']:.4f}\t{item}")
        elif "labels" in answer:
            print(f"{','.join(answer['labels']) or '-'}\t{item}")
        elif "entities" in answer:
            shown = "; ".join(f"{e['type']}: {e['text']} ({e['score']:.2f})" for e in answer["entities"]) or "-"
            print(f"{shown}\t{item}")
        elif "answer" in answer:
            print(f"{answer['answer'] or '-'}\t{answer['score']:.4f}\t{item['question']}")
        elif "choice" in answer:
            print(f"{answer['choice']}\t{answer['score']:.4f}\t{answer['text']}")
        else:
            print(f"{answer['value']:.4f}\t{item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
