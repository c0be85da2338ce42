"""What bench/pretrain.py and bench/distill.py share: run a finetune command in a fresh process, read its MLflow run.

Their full runs take hours, longer than a working session on two cores, so a stopped benchmark can be continued
(`--resume`): the Runner keeps a journal of the commands it started and finished in the work folder, skips a
`finetune run`/`pretrain` that finished earlier (its figures are read back from the same MLflow store) and runs an
interrupted one again, which finetune continues from its newest checkpoint.
"""

from __future__ import annotations

import json
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

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, in_process: bool = False,
                 resume: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tracking = f"sqlite:///{self.workdir.resolve() / 'mlflow.db'}"
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking, **(env or {})}
        self.in_process = in_process
        self.resume = resume
        self.journal = self.workdir / "bench-journal.jsonl"

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
        """Run `finetune *args`; with `resume`, a training command that finished in an earlier attempt is not run
        again. `seconds` is the wall time, summed over attempts (an interrupted attempt counted up to its last
        checkpoint, the work it left)."""
        command = [sys.executable, "-m", "finetune", *args]
        earlier = self._earlier_attempts(args) if self.resume else _Attempts()
        if earlier.run_id is not None:
            print(f"$ finetune {shlex.join(args)}  # finished earlier (MLflow run {earlier.run_id}): not run again",
                  flush=True)
            return self._read_back(Finished(command, earlier.seconds, earlier.run_id), history)
        print(f"$ finetune {shlex.join(args)}", flush=True)
        self._journal("started", args, carried=earlier.seconds)
        started = time.perf_counter()
        code, stdout, stderr = self._run(args)
        seconds = time.perf_counter() - started
        if code != 0:
            sys.stderr.write(stdout[-4000:] + stderr[-4000:])
            raise SystemExit(f"failed ({code}): finetune {shlex.join(args)}")
        found = RUN_LINE.search(stdout)
        self._journal("finished", args, seconds=earlier.seconds + seconds, run_id=found.group(1) if found else None)
        return self._read_back(Finished(command, earlier.seconds + seconds, found.group(1) if found else None), history)

    def _read_back(self, result: Finished, history: tuple[str, ...]) -> Finished:
        if result.run_id:
            import mlflow

            client = mlflow.MlflowClient(self.tracking)
            result.metrics = dict(client.get_run(result.run_id).data.metrics)
            for key in history:
                points = client.get_metric_history(result.run_id, key)
                result.history[key] = sorted((p.step, p.value) for p in points)
        return result

    def _journal(self, event: str, args: tuple[str, ...], **values) -> None:
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, "args": list(args), "time": time.time(), **values}) + "\n")

    def _earlier_attempts(self, args: tuple[str, ...]) -> _Attempts:
        """What earlier attempts of exactly this command left: the MLflow run of one that finished (if its output
        folder still says so), or the seconds the interrupted ones spent up to their last checkpoint."""
        if not self.journal.exists() or args[:1] not in (("run",), ("pretrain",)):
            return _Attempts()
        entries = [e for e in map(json.loads, self.journal.read_text(encoding="utf-8").splitlines())
                   if e["args"] == list(args)]
        if not entries:
            return _Attempts()
        last = entries[-1]
        out = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("output_dir=")), None)
        if last["event"] == "finished":
            if last["run_id"] and _finished_folder(out, last["run_id"]):
                return _Attempts(last["seconds"], last["run_id"])
            return _Attempts()  # trained again or removed since: the journal is stale for it
        return _Attempts(last["carried"] + _progress_seconds(out, last["time"]))  # stopped: finetune resumes it

    def artifact(self, run_id: str, path: str) -> Path:
        import mlflow

        mlflow.set_tracking_uri(self.tracking)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(self.workdir / "artifacts" / run_id)))


@dataclass
class _Attempts:
    seconds: float = 0.0
    run_id: str | None = None


def _finished_folder(out: Path | None, run_id: str) -> bool:
    """Whether finetune's marker in `out` says the run `run_id` finished there."""
    from finetune.training.outputs import read_marker

    marker = read_marker(out) if out is not None else None
    return bool(marker) and marker.get("state") == "finished" and marker.get("mlflow_run_id") == run_id


def _progress_seconds(out: Path | None, started: float) -> float:
    """Seconds from an interrupted attempt's start to its newest resume checkpoint (0 if it left none)."""
    steps = list((out / "checkpoints").glob("step-*")) if out is not None else []
    newest = max((p.stat().st_mtime for p in steps), default=started)
    return max(0.0, newest - started)


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
