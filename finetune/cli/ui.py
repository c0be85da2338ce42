"""`finetune ui`: MLflow's UI on the tracking store, as one process group that stops with this process.

`mlflow ui` starts a server process of its own (uvicorn) below it, so killing the command's PID alone, as a
person stops any process, would leave that server holding the port. Here the UI runs in its own process
group; SIGTERM, SIGINT (Ctrl-C) and SIGHUP on this process stop the whole group (SIGKILL after a grace
period), and this process says when the UI answers. A store that is not there is not created: the UI then
shows an empty temporary one and says so.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from finetune.errors import FinetuneError, StoreError

READY_TIMEOUT_S = 180.0
STOP_GRACE_S = 10.0


class _Stop(Exception):
    """A signal asked this process to stop."""


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise FinetuneError(f"port {port} on {host} is in use (another finetune ui or MLflow server?); "
                                    "stop it, or choose another port with --port") from None
            raise FinetuneError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to every process of the child's group, SIGKILL to what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so only live members keep the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.poll()


LOG_FILE = "ui.log"


def ui_log() -> "os.PathLike[str]":
    """Where the UI server's own output goes (MLflow's and uvicorn's start-up lines, its errors): ui.log in
    finetune's cache folder, replaced at each start."""
    from finetune.data.features import cache_home

    folder = cache_home()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / LOG_FILE


def _tail(path: "os.PathLike[str]", lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


def run_ui(host: str, port: int, verbose: bool = False) -> int:
    """Serve the MLflow UI until this process is told to stop; 0 when stopped by a signal or Ctrl-C.

    The terminal shows our lines only (starting, ready, stopped); the server's output goes to `ui_log()`, and to
    the terminal's stderr as well with `verbose`."""
    from finetune.tracking.store import existing_store

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding the MLflow UI to {host} exposes it beyond this machine", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="finetune-ui-") as tmp:
        try:
            uri = existing_store()
        except StoreError as e:
            print(f"warning: {e}. Showing an empty temporary store instead.", file=sys.stderr)
            uri = f"sqlite:///{tmp}/empty.db"
        _check_port(host, port)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        print(f"starting the MLflow UI for {uri} ...", file=sys.stderr, flush=True)
        # One worker and no job runner: a UI for one person, with fewer processes to start and to stop; no line
        # per request on the terminal.
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               "--workers", "1", "--uvicorn-opts", "--no-access-log"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

        def stop(signum, frame):
            raise _Stop(signum)

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        # The server's output goes to the log (and with --verbose to stderr, descriptor 2): stdout carries only the
        # ready line, stderr only our own.
        log_path = ui_log()
        log = None if verbose else open(log_path, "w", encoding="utf-8")
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=2 if verbose else log, stderr=2 if verbose else log,
                                    start_new_session=True)
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not _answers(f"{url}/health"):
                if proc.poll() is not None:
                    where = "its output is above" if verbose else f"its output, in {log_path}, ends: {_tail(log_path)}"
                    raise FinetuneError(f"the MLflow UI exited with status {proc.returncode} before it answered "
                                        f"({where})")
                if time.monotonic() > deadline:
                    raise FinetuneError(f"the MLflow UI did not answer at {url} within {READY_TIMEOUT_S:.0f} s "
                                        f"(its output: {'above' if verbose else log_path})")
                time.sleep(0.3)
            print(f"MLflow UI ready at {url} for {uri}  (Ctrl-C stops it)", flush=True)
            if not verbose:
                print(f"log: {log_path} (the server's own lines; --verbose shows them here)", file=sys.stderr,
                      flush=True)
            code = proc.wait()
            if code != 0:
                raise FinetuneError(f"the MLflow UI stopped with status {code} (its output: "
                                    f"{'above' if verbose else log_path})")
            return 0
        except _Stop:
            print("stopped the MLflow UI", file=sys.stderr, flush=True)
            return 0
        finally:
            for sig in previous:  # a second Ctrl-C must not cut the clean-up short
                signal.signal(sig, signal.SIG_IGN)
            stop_group(proc)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
