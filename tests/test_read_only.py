"""Commands that only read MLflow never create a store, and `finetune ui` stops with its whole process tree."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from finetune.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.no_store]  # every test here starts where no store is
BIN = Path(sys.executable).parent
RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("argv", [
    ["compare"],
    ["promote", RUN_ID],
    ["predict", RUN_ID, "a gripping, beautiful film"],
    ["export", RUN_ID, "exported"],
    ["serve"],  # the server's own entry point (`finetune serve` execs it), run here in-process
])
def test_read_only_commands_without_a_store_say_where_they_looked(tmp_path, capsys, argv):
    if argv[0] == "serve":
        from serving.cli import main as serve_main

        code = serve_main(argv[1:])
    else:
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    store = tmp_path / "mlflow.db"
    assert f"no MLflow store at sqlite:///{store}" in err and "$MLFLOW_TRACKING_URI" in err, err
    assert "this command does not create one" in err and "MLFLOW_TRACKING_URI=sqlite:////path/to/mlflow.db" in err
    assert not store.exists() and not (tmp_path / "mlruns").exists(), "a read-only command created a store"


def test_the_default_store_is_named_as_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["compare"]) == 2
    assert "no MLflow store at sqlite:///mlflow.db (the default, sqlite:///mlflow.db in the current folder)" in \
        capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_ui_stopped_by_its_pid_stops_the_mlflow_server_too(tmp_path):
    port = _free_port()
    # Its own session, so that whatever this test leaves behind can be cleaned up; the test itself kills one PID.
    ui = subprocess.Popen([str(BIN / "finetune"), "ui", "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=os.environ.copy(), start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in ui.stdout], daemon=True).start()
    children: list[psutil.Process] = []
    try:
        ready = lines.get(timeout=180)
        assert f"MLflow UI ready at http://127.0.0.1:{port}" in ready
        assert _listening(port)
        children = psutil.Process(ui.pid).children(recursive=True)
        assert children, "the UI runs in child processes"

        os.kill(ui.pid, signal.SIGTERM)  # as a person stops any process: its PID, nothing else
        assert ui.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], f"left running: {[p.cmdline() for p in alive]}"
        assert not _listening(port), f"something still listens on port {port}"
        err = ui.stderr.read()
        assert "no MLflow store at" in err and "Showing an empty temporary store instead" in err
        assert not (tmp_path / "mlflow.db").exists(), "the UI created a store"
    finally:
        for proc in [*children, psutil.Process(ui.pid)] if ui.poll() is None else children:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        ui.wait(timeout=30)


def test_ui_refuses_a_busy_port(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
