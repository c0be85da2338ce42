"""What bench/pretrain.py and bench/distill.py share: run a finetune command in a fresh process, read its MLflow run."""

from __future__ import annotations

import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_LINE = re.compile(r"^MLflow: experiment \S+, run ([0-9a-f]{32}) in ", re.MULTILINE)


@dataclass
class Finished:
    """One finished command: its wall time, its MLflow run's final metrics and the history of chosen metrics."""

    command: list[str]
    seconds: float
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


class Runner:
    """Runs `finetune` commands from the repository root (recipes name their data relative to it), each in its own
    process, logging to one MLflow store in `workdir`, printing each command before it starts.

    `in_process` (smoke runs only) calls the command line in this process instead, which saves the 10-20 s each
    fresh process spends importing torch, transformers and MLflow; the timings are then not worth reading.
    """

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, in_process: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tracking = f"sqlite:///{self.workdir.resolve() / 'mlflow.db'}"
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking, **(env or {})}
        self.in_process = in_process

    def _run(self, args: tuple[str, ...]) -> tuple[int, str, str]:
        if not self.in_process:
            done = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=ROOT, env=self.env,
                                  capture_output=True, text=True)
            return done.returncode, done.stdout, done.stderr
        import contextlib
        import io

        from finetune.cli import main

        out, err, cwd, saved = io.StringIO(), io.StringIO(), os.getcwd(), dict(os.environ)
        os.environ.update(self.env)
        os.chdir(ROOT)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(args))
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(saved)
        return code, out.getvalue(), err.getvalue()

    def finetune(self, *args: str, history: tuple[str, ...] = ()) -> Finished:
        command = [sys.executable, "-m", "finetune", *args]
        print(f"$ finetune {shlex.join(args)}", flush=True)
        started = time.perf_counter()
        code, stdout, stderr = self._run(args)
        seconds = time.perf_counter() - started
        if code != 0:
            sys.stderr.write(stdout[-4000:] + stderr[-4000:])
            raise SystemExit(f"failed ({code}): finetune {shlex.join(args)}")
        found = RUN_LINE.search(stdout)
        result = Finished(command, seconds)
        if found:
            import mlflow

            client = mlflow.MlflowClient(self.tracking)
            result.run_id = found.group(1)
            result.metrics = dict(client.get_run(result.run_id).data.metrics)
            for key in history:
                points = client.get_metric_history(result.run_id, key)
                result.history[key] = sorted((p.step, p.value) for p in points)
        return result

    def artifact(self, run_id: str, path: str) -> Path:
        import mlflow

        mlflow.set_tracking_uri(self.tracking)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(self.workdir / "artifacts" / run_id)))


def mean_sd(values: list[float]) -> str:
    """`0.8232 ± 0.0061` (sample standard deviation; just the value for one run)."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
