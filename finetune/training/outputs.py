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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from finetune.errors import CheckpointError, FinetuneError, RecipeError
from finetune.files import OUTPUT_MARKER, is_link, is_output_folder, read_json, refuse_link, write_atomic
from finetune.files import output_files
from finetune.models.checksums import STAGING_MARKER, is_staging, read_manifest
from finetune.models.modeling import (
    MANIFEST_FILE, METADATA_FILE, check_save_target, recover_model_dir, staging_dirs,
)
from finetune.tracking.tracker import UNSENT_METRICS_FILE
from finetune.training import state as training_state

MARKER_FILE = ".finetune-run.json"
MAX_MARKER_BYTES = 65_536
PROBE_FILE = ".write-test"  # preflight's check that the folder is writable
BEST_DIR = "best"


def warn(message: str) -> None:
    """How training tells the user what it did to an output folder (stderr, so it stands out from progress)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_marker(folder: Path | str) -> dict[str, Any] | None:
    """The marker of a folder finetune made, or None (no marker, or not one finetune wrote)."""
    path = Path(folder) / MARKER_FILE
    if is_link(path):
        return None  # a link is never finetune's marker
    try:
        marker = read_json(path, max_bytes=MAX_MARKER_BYTES)
    except (OSError, ValueError):  # finetune.files.RefusedDocument included: too large, too deep, not JSON
        return None
    return marker if isinstance(marker, dict) and marker.get("created_by") == "finetune" else None


def _is_run_log(name: str) -> bool:
    """`finetune run` opens its log (run.log, run.rank<N>.log) once the folder passed `check_output_dir`."""
    return name == "run.log" or re.fullmatch(r"run\.rank\d+\.log", name) is not None


def _entries(folder: Path) -> list[Path]:
    """A folder's entries but finetune's probe, its run log and a marker a kill left half-written (none makes it
    foreign)."""
    leftovers = (PROBE_FILE, f".{MARKER_FILE}.tmp")
    return [p for p in folder.iterdir() if p.name not in leftovers and not _is_run_log(p.name)
            and not re.fullmatch(rf"\.{re.escape(MARKER_FILE)}\.\d+\.tmp", p.name)] if folder.is_dir() else []


def check_output_dir(out: Path | str, overwrite: bool) -> None:
    """Refuse a non-empty output folder finetune did not make (no marker), unless `overwrite` adopts it."""
    out = Path(out)
    links = [p for p in _written_paths(out) if is_link(p)]
    if links:
        raise RecipeError(
            f"output_dir: {links[0]} is a symbolic link (-> {os.readlink(links[0])}); finetune does not write or "
            "delete through links, so the run would fail when it saves there: remove the link (what it points at "
            "is left alone) or choose another output_dir")
    try:
        check_save_target(out / BEST_DIR)
    except CheckpointError as e:
        raise RecipeError(f"output_dir: {e}") from None
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


def _written_paths(out: Path) -> list[Path]:
    """The places in an output folder that a run writes, replaces or deletes (a link at any of them is refused)."""
    checkpoints = training_state.checkpoints_dir(out)
    paths = [out / MARKER_FILE, out / BEST_DIR, *staging_dirs(out / BEST_DIR), checkpoints,
             out / UNSENT_METRICS_FILE, out / PROBE_FILE, out / "recipe.yaml"]
    if checkpoints.is_dir() and not is_link(checkpoints):
        paths += [checkpoints / training_state.FINISHED_FILE, checkpoints / training_state.SUPERSEDED_DIR]
        paths += [p for p in checkpoints.iterdir() if training_state.is_step_name(p.name)]
    return paths


def _write_marker(out: Path, marker: dict[str, Any]) -> None:
    refuse_link(out / MARKER_FILE, f"the output folder's marker {out / MARKER_FILE}")
    write_atomic(out / MARKER_FILE, json.dumps(marker, indent=2))


def claim(out: Path | str, recipe_name: str, recipe_hash: str, kind: str = "run", store: str | None = None,
          say: Callable[[str], None] | None = None) -> None:
    """Mark `out` as finetune's (main process only): a run is starting in it, by this process.

    When the run before it in this folder made a registered model's champion, its best/ is first moved to
    best-<its run id> (`keep_champion_model`), so a rerun never silently replaces the folder the champion came from.
    store: the MLflow tracking URI the runs go to (default `tracking_uri()`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_marker(out)
    if kind == "run" and previous is not None:
        keep_champion_model(out, previous, store, say or _say)
    marker = read_marker(out) or {"created_by": "finetune", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "kind": kind}
    if kind == "run":
        marker.update(recipe=recipe_name, recipe_hash=recipe_hash, state="running", pid=os.getpid(),
                      pid_started=_process_started(os.getpid()), host=socket.gethostname())
    else:
        marker.setdefault("recipe", recipe_name)
    _write_marker(out, marker)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def keep_champion_model(out: Path, marker: dict[str, Any], store: str | None = None,
                        say: Callable[[str], None] = _say) -> Path | None:
    """Move `out`/best to `out`/best-<run id> when the run that saved it made a registered model's champion;
    returns where it went (None: nothing to keep apart).

    The champion itself is served from the registry's logged copy, so replacing best/ would not change it; but
    best/ is where a person looks for the champion's model (its files, to copy or start from), and a rerun
    that quietly put another model there would leave a folder that no longer matches the registry.
    """
    from finetune.tracking.registry import champion_of
    from finetune.tracking.tracker import tracking_uri

    run_id = marker.get("mlflow_run_id")
    best = out / BEST_DIR
    if not isinstance(run_id, str) or not re.fullmatch(r"[0-9a-f]{32}", run_id) or is_link(best) \
            or not (best / METADATA_FILE).is_file() or _running(marker):
        return None
    champion = champion_of(run_id, store or tracking_uri())
    if champion is None:
        return None
    kept = out / f"{BEST_DIR}-{run_id}"
    if os.path.lexists(kept):
        say(f"note: {best} is the model of {champion} (MLflow run {run_id}) and {kept} already exists; this run "
            f"will replace {best} (the champion itself is served from the registry's copy, unaffected)")
        return None
    os.rename(best, kept)
    say(f"note: {best} held the model of the registered champion {champion} (MLflow run {run_id}): moved to {kept} "
        f"so this run's best/ does not replace it; the champion (served from the registry's copy) is unaffected")
    return kept


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
        return OutputFolder(folder, _other_kind(folder) or "foreign", size, None, None)
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


def _other_kind(folder: Path) -> str | None:
    """What finetune output other than a training run `folder` is ("export", "evaluation", "label-issues",
    "conversion"), or None when it is not finetune's."""
    if is_output_folder(folder):
        return " + ".join(sorted(output_files(folder)))
    if _conversion_report(folder) is not None:
        return "conversion"
    return None


def _conversion_report(folder: Path) -> dict[str, Any] | None:
    """The report `finetune convert` writes beside a converted checkpoint, when it is one."""
    from finetune.models.conversion_folder import REPORT_FILE

    path = folder / REPORT_FILE
    if is_link(path) or not path.is_file():
        return None
    try:
        report = read_json(path, max_bytes=MAX_MARKER_BYTES)
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and (folder / "config.json").is_file() else None


def _output_folders(root: Path) -> Iterator[Path]:
    """Folders under `root` worth listing: each child, and a finetune folder's finetune children (sweep trials)."""
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        yield child
        if read_marker(child) is not None:
            yield from (g for g in sorted(child.iterdir()) if g.is_dir() and not is_link(g)
                        and (read_marker(g) is not None or _other_kind(g) is not None))


def list_runs(root: Path | str = "runs") -> list[OutputFolder]:
    """Every output folder under `root` (default runs/), finetune's own and the others ("foreign")."""
    root = Path(root)
    if not root.is_dir():
        raise FinetuneError(f"{root} is not a folder; give the folder that holds the output folders (default runs/)")
    return [describe(folder) for folder in _output_folders(root)]


# ---------------------------------------------------------------------------------------------
# finetune clean
# ---------------------------------------------------------------------------------------------


# Files a model folder of finetune's holds besides those its manifest lists (and, in folders saved before manifests,
# the files transformers, tokenizers and peft write).
_MODEL_EXTRAS = {MANIFEST_FILE, METADATA_FILE, "recipe.yaml", "MODEL_CARD.md", STAGING_MARKER}
_MODEL_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|"
                          r"vocab|adapter_config|preprocessor_config)\.json|model(-\d+-of-\d+)?\.safetensors|"
                          r"model\.safetensors\.index\.json|adapter_model\.safetensors|vocab\.txt|merges\.txt|"
                          r"spiece\.model|sentencepiece\.bpe\.model|chat_template\.jinja|README\.md")


def _strangers(folder: Path, allowed: Callable[[str], bool]) -> list[str]:
    """Entries under `folder` that are links, or files whose path (relative to `folder`) `allowed` rejects."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if is_link(path) or (name in files and not allowed(rel)):
                found.append(rel)
    return sorted(found)


def _model_folder_strangers(best: Path) -> list[str]:
    """What in a model folder a save did not write: files its manifest does not list (or, without a manifest, files
    transformers does not write), and links."""
    try:
        listed = read_manifest(best, MANIFEST_FILE)
    except ValueError:
        listed = None
    if listed is not None:
        return _strangers(best, lambda rel: rel in listed or rel in _MODEL_EXTRAS)
    return _strangers(best, lambda rel: rel in _MODEL_EXTRAS or _MODEL_FILES.fullmatch(rel) is not None)


def _checkpoint_strangers(step: Path) -> list[str]:
    """What in a resume checkpoint folder save_training_state did not write."""
    return _strangers(step, lambda rel: training_state.is_checkpoint_file(rel))


def _owned(folder: Path, resume_only: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    """What `finetune clean` deletes in one output folder of its own, and what it leaves though it has one of
    finetune's names, with why: a link (never followed), or a folder holding files finetune does not write there.

    The marker says the folder is finetune's; each thing deleted must also look like what finetune writes, so a
    copied or forged marker does not turn a user's folder into finetune's.
    """
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []

    def consider(path: Path, strangers: list[str]) -> None:
        if strangers:
            shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
            skipped.append((path, f"it holds what finetune does not write there ({shown})"))
        else:
            found.append(path)

    checkpoints = training_state.checkpoints_dir(folder)
    best = folder / BEST_DIR
    for path in (checkpoints, checkpoints / training_state.SUPERSEDED_DIR, best, *staging_dirs(best)):
        if is_link(path):
            skipped.append((path, "a symbolic link; finetune never follows links (remove it yourself if it is not "
                                  "needed: what it points at is left alone)"))
    if not is_link(checkpoints):
        for path in training_state.checkpoint_folders(folder):
            consider(path, _checkpoint_strangers(path))
    if resume_only:
        return found, skipped
    if not is_link(best) and best.is_dir() and (best / METADATA_FILE).is_file():
        consider(best, _model_folder_strangers(best))
    found += [p for p in staging_dirs(best) if is_staging(p, BEST_DIR)]
    found += [p for p in (checkpoints / training_state.FINISHED_FILE, folder / UNSENT_METRICS_FILE,
                          folder / PROBE_FILE) if not is_link(p) and p.is_file() and not is_link(p.parent)]
    return found, skipped


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        if is_link(folder):
            continue
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
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Things with finetune's names left alone, and why (a link; a folder holding files finetune did not write; a
    deletion the system refused)."""


@dataclass
class _Plan:
    folder: Path
    targets: list[Path]
    skipped: list[tuple[Path, str]]
    resume_only: bool
    outputs: bool = False  # an export/evaluation folder (files listed in its OUTPUT_MARKER), not a training run's


def _plain_file_inside(folder: Path, name: str) -> bool:
    """Whether `name` (relative) is a regular file under `folder` reached through real folders only."""
    path = folder / name
    return all(not is_link(folder / parent) for parent in Path(name).parents if str(parent) != ".") \
        and not is_link(path) and path.is_file()


def _plan(path: Path, resume_only: bool, plans: list[_Plan | Cleaned]) -> None:
    """What `clean` would do under `path`, decided for every folder before anything is deleted."""
    if is_link(path) and plans:  # a link below the folder given: never followed
        return
    if not path.is_dir():
        plans.append(Cleaned(path, [], [], "not a folder"))
        return
    marker = read_marker(path)
    children = sorted(p for p in path.iterdir() if p.is_dir() and not is_link(p)
                      and (read_marker(p) is not None or _other_kind(p) is not None))
    if marker is None and is_output_folder(path):
        # An export, evaluation or label-issues folder: its marker lists the files finetune wrote there, and only
        # those (real files, reached through real folders) are deleted, then the marker.
        targets = [] if resume_only else [path / name for name in sorted(set().union(*output_files(path).values()))
                                          if _plain_file_inside(path, name)] + [path / OUTPUT_MARKER]
        plans.append(_Plan(path, targets, [], resume_only, outputs=True))
        return
    if marker is None and _conversion_report(path) is not None:
        plans.append(Cleaned(path, [], [], "a converted checkpoint (`finetune convert`): clean leaves it, as it is a "
                                           "starting point rather than a run's output; delete it yourself if unneeded"))
        return
    if marker is None:
        if not children:
            plans.append(Cleaned(path, [], [], f"finetune did not make it (no {MARKER_FILE}); nothing deleted"))
        for child in children:
            _plan(child, resume_only, plans)
        return
    if _running(marker):
        plans.append(Cleaned(path, [], [], f"a run is in progress in it (pid {marker['pid']}); nothing deleted"))
        return
    for child in children:  # sweep trials
        _plan(child, resume_only, plans)
    targets, skipped = _owned(path, resume_only)
    plans.append(_Plan(path, targets, skipped, resume_only))


def _delete(path: Path) -> None:
    if is_link(path):  # checked when planned; a link put there since is still not followed
        raise OSError(f"{path} became a symbolic link")
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def clean(path: Path | str, resume_only: bool = False, dry_run: bool = False) -> list[Cleaned]:
    """Delete what finetune wrote in the output folder `path` (only its resume checkpoints with `resume_only`).

    A folder without the marker is refused, except that a folder holding output folders (runs/, a sweep's
    folder) has each of those cleaned. A run in progress is refused. Everything is checked before anything is
    deleted; links are never followed, and a folder with finetune's name that holds files finetune does not write
    there is left alone and named (`Cleaned.skipped`), as is one the system refuses to delete.
    """
    plans: list[_Plan | Cleaned] = []
    _plan(Path(path), resume_only, plans)
    done: list[Cleaned] = []
    for plan in plans:
        if isinstance(plan, Cleaned):
            done.append(plan)
            continue
        removed, skipped = [], list(plan.skipped)
        for p in plan.targets:
            size = folder_size(p)
            if not dry_run:
                try:
                    _delete(p)
                except OSError as e:
                    skipped.append((p, f"not deleted: {e.strerror or e}"))
                    continue
            removed.append((p, size))
        if plan.outputs:
            if not dry_run:
                _remove_empty(sorted((p for p in plan.folder.rglob("*") if p.is_dir() and not is_link(p)),
                                     key=lambda p: -len(p.parts)) + [plan.folder])
            kept = sorted(p for p in plan.folder.iterdir()) if plan.folder.is_dir() and not dry_run else []
            done.append(Cleaned(plan.folder, removed, kept, skipped=skipped))
            continue
        if not dry_run:
            _tidy(plan.folder, plan.resume_only)
        done.append(Cleaned(plan.folder, removed, _foreign_entries(plan.folder), skipped=skipped))
    return done


def _tidy(folder: Path, resume_only: bool) -> None:
    """After deleting: the folders finetune made that are now empty, and the marker of a folder left with nothing."""
    checkpoints = training_state.checkpoints_dir(folder)
    if is_link(checkpoints):
        return
    superseded = checkpoints / training_state.SUPERSEDED_DIR
    if superseded.is_dir() and not is_link(superseded):
        _remove_empty(sorted(superseded.iterdir()) + [superseded])
    if not resume_only:
        _remove_empty([checkpoints])
        if [p.name for p in folder.iterdir()] == [MARKER_FILE] and not is_link(folder / MARKER_FILE):
            (folder / MARKER_FILE).unlink()
            _remove_empty([folder])


def _foreign_entries(folder: Path) -> list[Path]:
    """Entries of an output folder finetune did not write (left alone by `clean`)."""
    if not folder.is_dir():
        return []
    ours = {BEST_DIR, "checkpoints", MARKER_FILE, UNSENT_METRICS_FILE, PROBE_FILE}
    return sorted(p for p in folder.iterdir() if p.name not in ours and not is_staging(p, BEST_DIR)
                  and (is_link(p) or (read_marker(p) is None and not (p.is_dir() and _other_kind(p)))))
