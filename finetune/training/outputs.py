"""A run's output folder (`output_dir`): how finetune knows it made it, what is in it, `finetune runs` and `clean`.

finetune writes into an output folder only if it is new, empty, or carries finetune's marker
`.finetune-run.json` (the recipe, the MLflow run, whether it finished); any other non-empty folder is refused
unless `finetune run --overwrite` is given, which adopts it. Even in its own folder finetune deletes only what
it writes (`OWNED`): `best/` and its interrupted saves, the `step-N` checkpoints and their interrupted saves, the
checkpoints moved aside to `checkpoints/superseded/`, the unsent-metrics file, the marker; whatever else is
there is left alone, by training and by `finetune clean` alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from finetune.errors import FinetuneError, RecipeError
from finetune.models.modeling import METADATA_FILE, recover_model_dir, staging_dirs
from finetune.tracking.tracker import UNSENT_METRICS_FILE
from finetune.training import state as training_state

MARKER_FILE = ".finetune-run.json"
PROBE_FILE = ".write-test"  # preflight's check that the folder is writable
BEST_DIR = "best"


def warn(message: str) -> None:
    """How training tells the user what it did to an output folder (stderr, so it stands out from progress)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_marker(folder: Path | str) -> dict[str, Any] | None:
    """The marker of a folder finetune made, or None (no marker, or not one finetune wrote)."""
    path = Path(folder) / MARKER_FILE
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("created_by") == "finetune" else None


def _is_run_log(name: str) -> bool:
    """`finetune run` opens its log (run.log, run.rank<N>.log) once the folder passed `check_output_dir`."""
    return name == "run.log" or re.fullmatch(r"run\.rank\d+\.log", name) is not None


def _entries(folder: Path) -> list[Path]:
    """A folder's entries but finetune's probe, its run log and a marker a kill left half-written (none makes it
    foreign)."""
    leftovers = (PROBE_FILE, f".{MARKER_FILE}.tmp")
    return [p for p in folder.iterdir() if p.name not in leftovers and not _is_run_log(p.name)] if folder.is_dir() else []


def check_output_dir(out: Path | str, overwrite: bool) -> None:
    """Refuse a non-empty output folder finetune did not make (no marker), unless `overwrite` adopts it."""
    out = Path(out)
    if overwrite or read_marker(out) is not None:
        return
    entries = _entries(out)
    if entries:
        shown = ", ".join(sorted(p.name for p in entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise RecipeError(
            f"output_dir: {out} already holds files finetune did not write ({shown}) and has no {MARKER_FILE}, so "
            "finetune will not write or delete anything in it; choose another output_dir, empty it, or pass "
            "`finetune run --overwrite` to use it anyway (finetune then replaces its best/ and checkpoints/step-N "
            "folders and leaves everything else alone)")


def _write_marker(out: Path, marker: dict[str, Any]) -> None:
    tmp = out / f".{MARKER_FILE}.tmp"
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, out / MARKER_FILE)


def claim(out: Path | str, recipe_name: str, recipe_hash: str, kind: str = "run") -> None:
    """Mark `out` as finetune's (main process only): a run is starting in it, by this process."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = read_marker(out) or {"created_by": "finetune", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "kind": kind}
    if kind == "run":
        marker.update(recipe=recipe_name, recipe_hash=recipe_hash, state="running", pid=os.getpid(),
                      pid_started=_process_started(os.getpid()), host=socket.gethostname())
    else:
        marker.setdefault("recipe", recipe_name)
    _write_marker(out, marker)


def update_marker(out: Path | str, **values: Any) -> None:
    """Record the MLflow run id, or that the run finished."""
    marker = read_marker(out)
    if marker is not None:
        _write_marker(Path(out), marker | values)


def release(out: Path | str) -> None:
    """After a run of this process ended: a marker still saying it is running says it failed."""
    marker = read_marker(out)
    if marker is not None and marker.get("state") == "running" and marker.get("pid") == os.getpid():
        update_marker(out, state="failed")


def may_claim(out: Path | str) -> bool:
    """Whether finetune may mark `out` as its own: it is new, empty or already finetune's."""
    return read_marker(out) is not None or not _entries(Path(out))


def recover(out: Path | str, say: Callable[[str], None] = warn) -> None:
    """Finish or undo a save of best/ that a crash interrupted (checkpoints: `state.find_resumable`)."""
    for done in recover_model_dir(Path(out) / BEST_DIR):
        say(done)


# ---------------------------------------------------------------------------------------------
# finetune runs
# ---------------------------------------------------------------------------------------------


def folder_size(path: Path) -> int:
    """Bytes in the files under `path` (symlinks not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def _process_started(pid: int) -> float | None:
    """When process `pid` started (None if there is none): with the pid, it tells a live run from a reused pid."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def _running(marker: dict[str, Any]) -> bool:
    """Whether the marker's run is in progress: the process of this host that marked it is still alive."""
    if marker.get("state") != "running" or marker.get("host") != socket.gethostname():
        return False
    try:
        started = _process_started(int(marker["pid"]))
    except (KeyError, ValueError, TypeError):
        return False
    return started is not None and abs(started - float(marker.get("pid_started") or 0)) < 1


@dataclass
class OutputFolder:
    """One output folder as `finetune runs` shows it."""

    path: Path
    state: str
    size: int
    run_id: str | None
    recipe: str | None

    def row(self) -> dict[str, Any]:
        return {"path": str(self.path), "state": self.state, "size_mb": round(self.size / 2**20, 1),
                "mlflow_run": self.run_id or "", "recipe": self.recipe or ""}


def describe(folder: Path) -> OutputFolder:
    """State of an output folder: finished, resumable (from step-N), running, unfinished, sweep or foreign."""
    marker = read_marker(folder)
    size = folder_size(folder)
    if marker is None:
        return OutputFolder(folder, "foreign", size, None, None)
    checkpoints = training_state.checkpoints_dir(folder)
    latest = training_state.latest_checkpoint(folder)
    if marker.get("kind") == "sweep":
        state = "sweep"
    elif _running(marker):
        state = f"running (pid {marker['pid']})"
    elif (checkpoints / training_state.FINISHED_FILE).exists():
        state = "finished" + (" (checkpoints kept)" if latest is not None else "")
    elif latest is not None:
        state = f"resumable from {latest.name}"
    else:
        state = "unfinished, nothing to resume"
    if (checkpoints / training_state.SUPERSEDED_DIR).is_dir():
        state += ", superseded checkpoints kept"
    return OutputFolder(folder, state, size, marker.get("mlflow_run_id"), marker.get("recipe"))


def _output_folders(root: Path) -> Iterator[Path]:
    """Folders under `root` worth listing: each child, and a finetune folder's finetune children (sweep trials)."""
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        yield child
        if read_marker(child) is not None:
            yield from (g for g in sorted(child.iterdir()) if g.is_dir() and read_marker(g) is not None)


def list_runs(root: Path | str = "runs") -> list[OutputFolder]:
    """Every output folder under `root` (default runs/), finetune's own and the others ("foreign")."""
    root = Path(root)
    if not root.is_dir():
        raise FinetuneError(f"{root} is not a folder; give the folder that holds the output folders (default runs/)")
    return [describe(folder) for folder in _output_folders(root)]


# ---------------------------------------------------------------------------------------------
# finetune clean
# ---------------------------------------------------------------------------------------------


def _owned(folder: Path, resume_only: bool) -> list[Path]:
    """What `finetune clean` deletes in one output folder of its own (never anything else)."""
    found = training_state.checkpoint_folders(folder)
    if resume_only:
        return found
    best = folder / BEST_DIR
    if (best / METADATA_FILE).is_file():
        found.append(best)
    found += [p for p in staging_dirs(best) if p.is_dir()]
    found += sorted(p for p in folder.glob(f".{BEST_DIR}-*") if p.is_dir() and p not in found)
    checkpoints = training_state.checkpoints_dir(folder)
    found += [p for p in (checkpoints / training_state.FINISHED_FILE, folder / UNSENT_METRICS_FILE,
                          folder / PROBE_FILE) if p.is_file()]
    return found


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()  # only if empty: anything finetune did not write stays, and so does its folder
        except OSError:
            pass


@dataclass
class Cleaned:
    """What `clean` did (or, with dry_run, would do) to one output folder."""

    folder: Path
    removed: list[tuple[Path, int]]
    kept: list[Path]
    refused: str | None = None


def clean(path: Path | str, resume_only: bool = False, dry_run: bool = False) -> list[Cleaned]:
    """Delete what finetune wrote in the output folder `path` (only its resume checkpoints with `resume_only`).

    A folder without the marker is refused, except that a folder holding output folders (runs/, a sweep's
    folder) has each of those cleaned. A run in progress is refused.
    """
    path = Path(path)
    if not path.is_dir():
        return [Cleaned(path, [], [], "not a folder")]
    marker = read_marker(path)
    if marker is None:
        children = sorted(p for p in path.iterdir() if p.is_dir() and read_marker(p) is not None)
        if not children:
            return [Cleaned(path, [], [], f"finetune did not make it (no {MARKER_FILE}); nothing deleted")]
        return [c for child in children for c in clean(child, resume_only, dry_run)]
    if _running(marker):
        return [Cleaned(path, [], [], f"a run is in progress in it (pid {marker['pid']}); nothing deleted")]
    done: list[Cleaned] = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and read_marker(p) is not None):
        done += clean(child, resume_only, dry_run)  # sweep trials
    targets = _owned(path, resume_only)
    removed = [(p, folder_size(p)) for p in targets]
    if not dry_run:
        for p in targets:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        checkpoints = training_state.checkpoints_dir(path)
        superseded = checkpoints / training_state.SUPERSEDED_DIR
        _remove_empty(sorted(superseded.glob("*")) + [superseded])
        if not resume_only:
            _remove_empty([checkpoints])
            if [p.name for p in path.iterdir()] == [MARKER_FILE]:
                (path / MARKER_FILE).unlink()
                _remove_empty([path])
    return done + [Cleaned(path, removed, _foreign_entries(path))]


def _foreign_entries(folder: Path) -> list[Path]:
    """Entries of an output folder finetune did not write (left alone by `clean`)."""
    if not folder.is_dir():
        return []
    ours = {BEST_DIR, "checkpoints", MARKER_FILE, UNSENT_METRICS_FILE, PROBE_FILE}
    return sorted(p for p in folder.iterdir() if p.name not in ours and not p.name.startswith(f".{BEST_DIR}-")
                  and read_marker(p) is None)
