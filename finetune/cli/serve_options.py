"""The options of `finetune serve` (its implementation is the `serving` package's: serving/cli.py)."""

from __future__ import annotations

import argparse

from finetune.cli.options import add_threads_option
from finetune.files import MAX_INPUT_CHARS

KEY_ENV = "FINETUNE_API_KEY"


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0 (got {text})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The options of `finetune serve`."""
    serve.add_argument("--model", action="append", metavar="[NAME=]SOURCE",
                       help="a model folder, an MLflow run id, or a runs:/ or models:/ URI (default: the champion); "
                            "repeat as NAME=SOURCE to serve several, each at /v1/models/NAME/predict (the first also at "
                            "/v1/predict); adapter models on the same base share one copy of it")
    serve.add_argument("--name", help="registered model whose champion to serve (default: the only one with a champion)")
    serve.add_argument("--recipe", help="serve the champion of this recipe's tracking.register_as")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; any other needs an API key)")
    serve.add_argument("--port", type=int, default=8000)
    # Kept only to refuse it with directions: a key on the command line shows in `ps` and shell history.
    serve.add_argument("--api-key", help=argparse.SUPPRESS)
    serve.add_argument("--api-key-file", metavar="PATH",
                       help=f"require the key in this file (X-API-Key or Authorization: Bearer) on every route but "
                            f"/healthz and /readyz; or set ${KEY_ENV}. The file must be yours and readable by you only "
                            f"(chmod 600), the key at least 16 characters and not repetitive (e.g. openssl rand -hex "
                            f"32); a client's wrong keys past 5 get 429 for 1, 2, 4 ... seconds")
    serve.add_argument("--insecure-no-api-key", action="store_true",
                       help="allow serving on a non-loopback --host without an API key")
    serve.add_argument("--allowed-hosts", type=_names, metavar="H1,H2",
                       help="Host header values accepted (name or name:port, *.example.com, or *); default: localhost, "
                            "127.0.0.1, [::1] and --host. Others get 400 (DNS rebinding)")
    serve.add_argument("--allowed-origins", type=_names, default=[], metavar="O1,O2",
                       help="web origins (https://app.example.com, or *) allowed to call the service from a browser, "
                            "with CORS headers; default none: cross-origin requests get 403 (same-origin ones pass)")
    serve.add_argument("--backend", choices=["auto", "torch", "onnx", "onnx-int8"], default="auto",
                       help="auto: ONNX Runtime when the model folder has model.onnx (finetune export), else PyTorch")
    serve.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="PyTorch backend: fp32 answers exactly as evaluation scored the model; bf16 (autocast) is "
                            "faster on CPUs that compute bf16 natively (AVX512-BF16, AMX) and on GPUs but may flip "
                            "answers near a tie; fp16 (autocast) is for GPUs")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where the PyTorch backend runs: auto (the GPU when PyTorch sees one, else the CPU), cpu, "
                            "or cuda (refused without a GPU)")
    add_threads_option(serve)
    serve.add_argument("--max-batch-size", type=_positive(int), default=16,
                       help="inputs per forward pass at most (16 measured fastest per sentence on 2 CPU cores)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests at most")
    serve.add_argument("--batch-wait", choices=("coming", "fixed"), default="coming",
                       help="what a batch waits for: 'coming', requests already being read and tokenised (a lone "
                            "request goes at once); 'fixed', --max-wait-ms before every batch (fuller batches from "
                            "steady traffic, for that much latency on every request)")
    serve.add_argument("--max-queue", type=_positive(int), default=512, help="inputs waiting at most; beyond it requests get 503")
    serve.add_argument("--max-inputs", type=_positive(int), default=64, help="inputs per request at most")
    serve.add_argument("--max-input-chars", type=_positive(int), default=MAX_INPUT_CHARS,
                       help=f"characters per input at most (all its texts), checked before tokenising (default "
                            f"{MAX_INPUT_CHARS}, as file scoring)")
    serve.add_argument("--timeout", type=_positive(float), default=30.0, help="seconds before a request gets 504")
    serve.add_argument("--max-connections", type=_positive(int), default=128,
                       help="connections open at once; more are answered 503 and closed (default 128)")
    serve.add_argument("--max-client-connections", type=_positive(int), default=32,
                       help="connections open at once from one client address (an IPv6 /64 counts as one), so one "
                            "client cannot hold them all; more are answered 503 and closed (default 32). Behind a "
                            "reverse proxy every client has the proxy's address: set it to --max-connections there")
    serve.add_argument("--header-timeout", type=_positive(float), default=10.0,
                       help="seconds for a request line and headers to arrive, else 408 (default 10)")
    serve.add_argument("--body-timeout", type=_positive(float), default=30.0,
                       help="seconds for a whole request body to arrive, else 408; also the longest a client may "
                            "leave a response unread (default 30)")
    serve.add_argument("--keep-alive", type=_positive(int), default=5,
                       help="seconds an idle kept-alive connection stays open (default 5)")
