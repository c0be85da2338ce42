"""`finetune serve`: starting the service (key, port and exposure checked first); `python -m serving` runs it.

Its options are defined with finetune's other commands (`finetune.cli.serve_options`), so `finetune serve
--help`, the README and the compose file describe one set of options; `finetune serve` becomes this process.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import re
import socket
import stat
import sys
from pathlib import Path
from typing import Sequence

from finetune.cli import build_parser
from finetune.cli.serve_options import KEY_ENV
from finetune.errors import FinetuneError, RecipeError
from finetune.files import RefusedDocument, read_text
from finetune.cli.options import apply_threads_option
from finetune.threads import cpu_budget



def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything, so it counts as exposed


MIN_KEY_CHARS = 16
MIN_KEY_DISTINCT = 6
KEY_ADVICE = "make one with: openssl rand -hex 32"


def key_problem(key: str) -> str | None:
    """Why a key is too weak to guard a service (None when it is not): too short, too few different characters, a
    short part repeated, or mostly runs (aaaa, abcd, 4321). The message never repeats the key."""
    if len(key) < MIN_KEY_CHARS:
        return f"the key is {len(key)} character{'s' if len(key) != 1 else ''} long; at least {MIN_KEY_CHARS} are required"
    if len(set(key)) < MIN_KEY_DISTINCT:
        return f"the key has only {len(set(key))} different characters; at least {MIN_KEY_DISTINCT} are required"
    for period in range(1, len(key) // 2 + 1):
        if all(key[i] == key[i % period] for i in range(len(key))):
            return f"the key is a part of {period} characters repeated"
    runs = sum(abs(ord(a) - ord(b)) <= 1 for a, b in zip(key, key[1:]))
    if runs > (len(key) - 1) // 2:
        return "the key is mostly repeated or consecutive characters (aaaa, abcd, 4321)"
    return None


def _key_file_problem(path: Path) -> str | None:
    """Why a key file may not be trusted, as ssh refuses a private key file: not a regular file, owned by another
    user (who could change the key), or readable or writable by group or others."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if info.st_uid not in (os.geteuid(), 0):
        return (f"it is owned by user id {info.st_uid}, not by you (user id {os.geteuid()}), so someone else can "
                f"change the key; chown it to yourself")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return (f"its permissions {mode:04o} are too open: other users of this machine can read the key; run "
                f"chmod 600 {path}")
    return None


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file or $FINETUNE_API_KEY (never the command line), checked: the file private to its
    owner, the key printable and strong enough."""
    if args.api_key is not None:
        raise RecipeError(f"--api-key would show the key to every user of this machine (ps, shell history); put it "
                          f"in a file readable only by you and pass --api-key-file PATH, or set ${KEY_ENV}")
    from_env = os.environ.get(KEY_ENV) or None
    if args.api_key_file is None:
        key, where = from_env, f"${KEY_ENV}"
    else:
        if from_env:
            raise RecipeError(f"both --api-key-file and ${KEY_ENV} are set; give the key one way")
        where = f"--api-key-file {args.api_key_file}"
        path = Path(args.api_key_file)
        try:
            problem = _key_file_problem(path)
            if problem:
                raise RecipeError(f"{where}: {problem}")
            key = read_text(path, max_bytes=4096).strip()
        except RefusedDocument as e:
            raise RecipeError(f"{where}: cannot read it ({e})") from None
        except OSError as e:
            raise RecipeError(f"{where}: cannot read it ({e.strerror or e})") from None
        if not key:
            raise RecipeError(f"{where} is empty")
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise RecipeError(f"{where}: the key must be printable ASCII without spaces (it travels in an HTTP header)")
    if key is not None:
        weak = key_problem(key)
        if weak:
            raise RecipeError(f"{where}: {weak} ({KEY_ADVICE})")
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


_CLIENT_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class QuietDisconnects(logging.Filter):
    """Drops asyncio's reports of a client that went away (a reset or broken pipe while writing to it, the
    "socket.send() raised exception" warnings after it): serving.requests already logs each as one 499 line, and a
    traceback there reads as a fault of the server. Anything else asyncio reports still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, _CLIENT_GONE):
            return False
        return not record.getMessage().startswith("socket.send() raised exception")


def _log_handler() -> None:
    """Client-caused events (disconnects, timeouts, refused connections) as one line each on stderr."""
    logging.getLogger("asyncio").addFilter(QuietDisconnects())
    logger = logging.getLogger("serving")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def shown(text: object) -> str:
    """Text from a model folder or the registry as the terminal shows it: control characters (escape sequences
    that would recolour, move or retitle the terminal) written as escapes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def serve(args: argparse.Namespace) -> int:
    """Check the key, the exposure and the port, then load the model and serve it until SIGTERM or Ctrl-C."""
    import uvicorn

    from finetune.cli.console import quiet_model_loading
    from finetune.config.recipe import load_recipe
    from serving.app import Settings, create_app
    from serving.gates import check_allowed_origins, default_allowed_hosts
    from serving.loading import load_models, parse_model_specs
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
    threads = apply_threads_option(args.threads)  # every model loaded below reads it
    # The server tokenises in threads of its own (serving.app.Lanes), one per model, beside the model's math; the
    # tokenizers library's own pool on top of them kept the model's threads waiting: three LoRA adapters sharing
    # passes served 38.6 requests/s with it, 79.8 without (bench/adapters.py, BENCHMARKS.md). A user's setting wins.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sock = _bind(args.host, args.port)
    quiet_model_loading()
    try:
        loaded, named = load_models(parse_model_specs(args.model), name, args.backend, args.precision, args.device)
    except FinetuneError:
        sock.close()
        raise
    settings = Settings(
        max_inputs_per_request=args.max_inputs, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        batch_wait=args.batch_wait, max_queue=args.max_queue, request_timeout_s=args.timeout, api_key=key,
        max_input_chars=args.max_input_chars,
        body_timeout_s=args.body_timeout, allowed_hosts=args.allowed_hosts or default_allowed_hosts(args.host),
        allowed_origins=origins, threads=threads,
    )
    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host} exposes the model beyond this machine"
              + ("" if key else " without an API key"), file=sys.stderr)
    version = f" version {shown(loaded.version)}" if loaded.version else ""
    merged = ", its adapter merged into the base" if loaded.merged else ""
    print(f"serving {shown(loaded.name)}{version} ({shown(loaded.predictor.info.task)}, {loaded.predictor.runtime}{merged}) "
          f"from {shown(loaded.source)} at http://{args.host}:{args.port}  (playground: /, docs: /docs)", flush=True)
    for model_name, model in named.items():
        print(f"  {model_name}: {shown(model.predictor.info.task)} from {shown(model.source)} at "
              f"/v1/models/{model_name}/predict", flush=True)
    print(f"threads: {threads} (fixed)" if threads is not None else
          f"threads: up to {cpu_budget()}, fewer while other processes keep cores busy (--threads N fixes it)", flush=True)
    _log_handler()
    config = uvicorn.Config(
        create_app(loaded, settings, named), host=args.host, port=args.port, log_level="warning",
        http=guarded_protocol(args.max_connections, args.header_timeout, args.body_timeout,
                              args.max_client_connections),
        timeout_keep_alive=args.keep_alive,
        # Long enough for a request that has just arrived to finish: its body, then its answer.
        timeout_graceful_shutdown=args.body_timeout + args.timeout,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving [serve options]`, what `finetune serve` runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(["serve", *argv])
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        return serve(args)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
