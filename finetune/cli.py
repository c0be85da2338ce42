"""The `finetune` command line: run, validate, predict, fields."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from finetune.recipe import RecipeError, describe_fields, load_recipe, recipe_to_yaml

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

    validate = sub.add_parser(
        "validate", help="check a recipe, its checkpoint and its data without training",
        epilog=_fields_epilog(), formatter_class=fmt,
    )
    validate.add_argument("recipe", help="recipe YAML file")
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)

    predict = sub.add_parser("predict", help="predict with a trained model")
    predict.add_argument("model", help="a model folder (runs/<name>/best), an MLflow run id, or a runs:/ or models:/ URI")
    predict.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify; for pair models, give them two by two")
    predict.add_argument("--json", action="store_true", help="print the full answers as JSON lines")

    sub.add_parser("fields", help="list every recipe key with its type, default and meaning")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fields":
            print(_fields_epilog())
            return 0
        if args.command == "run":
            return cmd_run(args.recipe, args.overrides)
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

        if isinstance(e, (CheckpointError, DataError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 1


def cmd_run(path: str, overrides: list[str]) -> int:
    recipe = load_recipe(path, overrides)
    print(f"# resolved recipe ({path})\n{recipe_to_yaml(recipe)}")
    from finetune import train

    train.main(recipe)
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
    if predictor.info.text_pair:
        if len(texts) % 2:
            raise RecipeError(f"this model reads sentence pairs: give texts two by two (got {len(texts)})")
        inputs = [[texts[i], texts[i + 1]] for i in range(0, len(texts), 2)]
    answers = model.predict(inputs)
    for item, answer in zip(inputs, answers):
        if as_json:
            print(json.dumps({"input": item, **answer}))
        elif "label" in answer:
            print(f"{answer['label']}\t{answer['score']:.4f}\t{item}")
        elif "labels" in answer:
            print(f"{','.join(answer['labels']) or '-'}\t{item}")
        else:
            print(f"{answer['value']:.4f}\t{item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
