"""`finetune serve`: the command that starts the HTTP service (`python -m serving serve ...` runs it too).

Its options are parsed by finetune's own parser (`finetune.cli.build_parser`), so `finetune serve --help`,
the README and the compose file describe one set of options.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from finetune.cli import build_parser
from finetune.config.recipe import load_recipe
from finetune.errors import FinetuneError, RecipeError


def serve(args: argparse.Namespace) -> int:
    """Load the model a `finetune serve` command names and serve it until SIGTERM or Ctrl-C."""
    import uvicorn

    from serving.app import Settings, create_app
    from serving.loading import load_models, parse_model_specs

    name = args.name
    if args.recipe:
        name = load_recipe(args.recipe).tracking.register_as
        if not name:
            raise RecipeError(f"{args.recipe} sets no tracking.register_as, so it has no champion; use --model")
    loaded, named = load_models(parse_model_specs(args.model), name, args.backend, args.precision)
    settings = Settings(
        max_inputs_per_request=args.max_inputs, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, request_timeout_s=args.timeout, api_key=args.api_key or os.environ.get("FINETUNE_API_KEY"),
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} exposes the model beyond this machine"
              + ("" if settings.api_key else " without an API key"), file=sys.stderr)
    version = f" version {loaded.version}" if loaded.version else ""
    print(f"serving {loaded.name}{version} ({loaded.predictor.info.task}, {loaded.predictor.runtime}) from {loaded.source} "
          f"at http://{args.host}:{args.port}  (playground: /, docs: /docs)", flush=True)
    for model_name, model in named.items():
        print(f"  {model_name}: {model.predictor.info.task} from {model.source} at /v1/models/{model_name}/predict", flush=True)
    uvicorn.run(create_app(loaded, settings, named), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=30)
    return 0



def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(["serve", *argv])
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        return serve(args)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
