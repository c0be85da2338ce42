"""`finetune serve`: its options, and starting the service with them (key, port and exposure checked first)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import re
import socket
import sys
from pathlib import Path

from finetune.recipe import RecipeError

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


def add_arguments(serve: argparse.ArgumentParser) -> None:
    """The options of `finetune serve`."""
    serve.add_argument("--model", help="a model folder, an MLflow run id, or a runs:/ or models:/ URI (default: the champion)")
    serve.add_argument("--name", help="registered model whose champion to serve (default: the only one with a champion)")
    serve.add_argument("--recipe", help="serve the champion of this recipe's tracking.register_as")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; any other needs an API key)")
    serve.add_argument("--port", type=int, default=8000)
    # Kept only to refuse it with directions: a key on the command line shows in `ps` and shell history.
    serve.add_argument("--api-key", help=argparse.SUPPRESS)
    serve.add_argument("--api-key-file", metavar="PATH",
                       help=f"require the key in this file (X-API-Key or Authorization: Bearer) on every route but "
                            f"/healthz and /readyz; or set ${KEY_ENV}")
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
    serve.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="PyTorch backend: fp32 answers exactly as evaluation scored the model; bf16 (autocast) is "
                            "faster on CPUs that compute bf16 natively (AVX512-BF16, AMX) but may flip answers near a tie")
    serve.add_argument("--max-batch-size", type=_positive(int), default=16,
                       help="inputs per forward pass at most (16 measured fastest per sentence on 2 CPU cores)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    serve.add_argument("--max-queue", type=_positive(int), default=512, help="inputs waiting at most; beyond it requests get 503")
    serve.add_argument("--max-inputs", type=_positive(int), default=64, help="inputs per request at most")
    serve.add_argument("--max-input-chars", type=_positive(int), default=100_000,
                       help="characters per input at most (all its texts), checked before tokenising (default 100000)")
    serve.add_argument("--timeout", type=_positive(float), default=30.0, help="seconds before a request gets 504")
    serve.add_argument("--max-connections", type=_positive(int), default=128,
                       help="connections open at once; more are answered 503 and closed (default 128)")
    serve.add_argument("--header-timeout", type=_positive(float), default=10.0,
                       help="seconds for a request line and headers to arrive, else 408 (default 10)")
    serve.add_argument("--body-timeout", type=_positive(float), default=30.0,
                       help="seconds for a whole request body to arrive, else 408; also the longest a client may "
                            "leave a response unread (default 30)")
    serve.add_argument("--keep-alive", type=_positive(int), default=5,
                       help="seconds an idle kept-alive connection stays open (default 5)")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything, so it counts as exposed


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file or $FINETUNE_API_KEY (never the command line), checked."""
    if args.api_key is not None:
        raise RecipeError(f"--api-key would show the key to every user of this machine (ps, shell history); put it "
                          f"in a file readable only by you and pass --api-key-file PATH, or set ${KEY_ENV}")
    from_env = os.environ.get(KEY_ENV) or None
    if args.api_key_file is None:
        key, where = from_env, f"${KEY_ENV}"
    else:
        if from_env:
            raise RecipeError(f"both --api-key-file and ${KEY_ENV} are set; give the key one way")
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"--api-key-file {args.api_key_file}: cannot read it ({e})") from None
        where = f"--api-key-file {args.api_key_file}"
        if not key:
            raise RecipeError(f"{where} is empty")
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise RecipeError(f"{where}: the key must be printable ASCII without spaces (it travels in an HTTP header)")
    return key


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, before the model loads: a busy port is reported at once, and stays ours meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait for TIME_WAIT
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)  # listening is what makes a second server's bind fail (SO_REUSEADDR allows two binds)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise RecipeError(f"port {port} on {host} is in use (another finetune serve?); stop it or choose --port") from None
        raise RecipeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _log_handler() -> None:
    """Client-caused events (disconnects, timeouts, refused connections) as one line each on stderr."""
    logger = logging.getLogger("serving")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def serve(args: argparse.Namespace) -> int:
    """Check the key, the exposure and the port, then load the model and serve it until SIGTERM or Ctrl-C."""
    import uvicorn

    from finetune.recipe import load_recipe
    from serving.app import Settings, create_app
    from serving.gates import check_allowed_origins, default_allowed_hosts
    from serving.loading import ModelSourceError, load_model
    from serving.protocol import guarded_protocol

    key = api_key(args)
    if not _is_loopback(args.host) and not key and not args.insecure_no_api_key:
        raise RecipeError(f"--host {args.host} serves beyond this machine, and no API key is set: give one with "
                          f"--api-key-file PATH or ${KEY_ENV}, or pass --insecure-no-api-key to serve it open")
    try:
        origins = check_allowed_origins(args.allowed_origins)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    name = args.name
    if args.recipe:
        name = load_recipe(args.recipe).tracking.register_as
        if not name:
            raise RecipeError(f"{args.recipe} sets no tracking.register_as, so it has no champion; use --model")
    sock = _bind(args.host, args.port)
    try:
        loaded = load_model(args.model, name, args.backend, args.precision)
    except ModelSourceError as e:
        sock.close()
        raise RecipeError(str(e)) from None
    settings = Settings(
        max_inputs_per_request=args.max_inputs, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, request_timeout_s=args.timeout, api_key=key, max_input_chars=args.max_input_chars,
        body_timeout_s=args.body_timeout, allowed_hosts=args.allowed_hosts or default_allowed_hosts(args.host),
        allowed_origins=origins,
    )
    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host} exposes the model beyond this machine"
              + ("" if key else " without an API key"), file=sys.stderr)
    version = f" version {loaded.version}" if loaded.version else ""
    print(f"serving {loaded.name}{version} ({loaded.predictor.info.task}, {loaded.predictor.runtime}) from {loaded.source} "
          f"at http://{args.host}:{args.port}  (docs: /docs)", flush=True)
    _log_handler()
    config = uvicorn.Config(
        create_app(loaded, settings), host=args.host, port=args.port, log_level="warning",
        http=guarded_protocol(args.max_connections, args.header_timeout, args.body_timeout),
        timeout_keep_alive=args.keep_alive,
        # Long enough for a request that has just arrived to finish: its body, then its answer.
        timeout_graceful_shutdown=args.body_timeout + args.timeout,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1
