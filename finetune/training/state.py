"""Training-state checkpoints: everything needed to continue an interrupted run exactly.

A checkpoint is a folder `output_dir/checkpoints/step-<N>/` holding the model weights, the optimizer
and scheduler state (and the fp16 gradient scaler's, on GPUs), every process's random-number states, the loop counters and the MLflow run id.
Written by hand rather than with `accelerator.save_state` because that pickles the optimizer and RNG
states, and loading a pickle can run code: here tensors go to safetensors and the rest to JSON, so
resuming never unpickles anything. Each checkpoint is written to a temporary folder, its `manifest.json`
(sizes and SHA-256 of every file) last, synced to disk and renamed into place, and only the newest `keep`
are kept, so a crash mid-write never destroys the last good one. Before a checkpoint is resumed it is
compared with its manifest; a damaged one is named and removed and the next older one is tried.
Only `step-N` folders are ever deleted here; checkpoints a run will not continue are moved aside to
`checkpoints/superseded/`, never dropped silently.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from finetune.errors import CheckpointError
from finetune.files import is_link, read_json, write_atomic
from finetune.models.checksums import STAGING_MARKER, fsync_path, is_staging, manifest_problem, mark_staging, write_manifest

STATE_FILE = "trainer_state.json"
FINISHED_FILE = "FINISHED"
MANIFEST_FILE = "manifest.json"
SUPERSEDED_DIR = "superseded"
REQUIRED_FILES = (STATE_FILE, "model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^\.step-(\d+)\.tmp$")
_CHECKPOINT_FILE = re.compile(r"(trainer_state|optimizer|scheduler|scaler|manifest|rng-\d+)\.json|"
                              r"(model|optimizer|rng-\d+)\.safetensors|" + re.escape(STAGING_MARKER))
MAX_STATE_JSON_BYTES = 256_000_000
"""The largest JSON file of a checkpoint read back (optimizer.json lists every parameter group: large models'
run to megabytes, never to this)."""


def is_step_name(name: str) -> bool:
    """Whether `name` is one finetune gives a checkpoint folder (step-N, or .step-N.tmp while it is written)."""
    return _STEP_DIR.match(name) is not None or _TMP_DIR.match(name) is not None


def is_checkpoint_file(name: str) -> bool:
    """Whether `name` is one `save_training_state` gives a file in a checkpoint folder."""
    return _CHECKPOINT_FILE.fullmatch(name) is not None


def _read_state_json(path: Path) -> Any:
    """A checkpoint's JSON file, bounded (`finetune.files`): ValueError when refused or not JSON."""
    return read_json(path, max_bytes=MAX_STATE_JSON_BYTES)


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not is_link(path)  # a link is never one of finetune's checkpoint folders


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirs(output_dir: str | Path) -> list[Path]:
    """The `step-N` checkpoint folders of output_dir, oldest first."""
    root = checkpoints_dir(output_dir)
    if not _is_folder(root):
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and _is_folder(p)]
    return [p for _, p in sorted(found)]


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every resume checkpoint finetune wrote under output_dir: step-N, interrupted saves, and those set aside."""
    root = checkpoints_dir(output_dir)
    if not _is_folder(root):
        return []
    found = step_dirs(output_dir) + sorted(p for p in root.iterdir() if _TMP_DIR.match(p.name) and _is_folder(p))
    superseded = root / SUPERSEDED_DIR
    if _is_folder(superseded):
        for run in sorted(p for p in superseded.iterdir() if _is_folder(p)):
            found += sorted(p for p in run.iterdir() if _STEP_DIR.match(p.name) and _is_folder(p))
    return found


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that was written to the end (it has its manifest, or the state file earlier
    versions wrote last), or None; `find_resumable` also compares its files with the manifest."""
    for path in reversed(step_dirs(output_dir)):
        if (path / MANIFEST_FILE).is_file() or (path / STATE_FILE).is_file():
            return path
    return None


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint folder (a missing, truncated or altered file), or None when it is intact."""
    if (path / MANIFEST_FILE).is_file():
        return manifest_problem(path, MANIFEST_FILE, REQUIRED_FILES)
    # Written by a version without manifests: every file must at least be there and readable.
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    for name in sorted(p.name for p in path.iterdir()):
        try:
            if is_link(path / name):
                return f"{name} is a symbolic link"
            if name.endswith(".json"):
                _read_state_json(path / name)
            elif name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(path / name), "pt") as f:
                    f.keys()
        except Exception as e:  # JSON, Unicode and safetensors errors alike: the file is damaged
            return f"{name} is unreadable ({type(e).__name__})"
    return None


def _strangers(folder: Path) -> list[str]:
    """Entries of a checkpoint folder that `save_training_state` does not write (links included)."""
    return sorted(p.name for p in folder.iterdir() if is_link(p) or not p.is_file() or not is_checkpoint_file(p.name))


def _recover_interrupted_saves(root: Path, say: Callable[[str], None]) -> None:
    """A `.step-N.tmp` a killed save left: put in place if its manifest was written and matches, else removed."""
    for tmp in sorted(p for p in root.iterdir() if _TMP_DIR.match(p.name) and _is_folder(p)):
        target = root / f"step-{_TMP_DIR.match(tmp.name).group(1)}"
        if (tmp / MANIFEST_FILE).is_file() and checkpoint_problem(tmp) is None and not target.exists() \
                and not is_link(target):
            os.replace(tmp, target)
            say(f"{tmp} was written completely before its save was interrupted: kept as {target.name}")
        elif is_staging(tmp, tmp.name):
            shutil.rmtree(tmp)
            say(f"removed {tmp}, a checkpoint whose save was interrupted")
        else:  # no marker: an earlier version's leftover, or a user's folder; never deleted unasked
            say(f"left {tmp} alone: it looks like an interrupted checkpoint save but has no {STAGING_MARKER}, so "
                "finetune cannot tell it made it; delete it yourself if it is not needed")


def _set_aside(root: Path, folders: list[Path], why: str, say: Callable[[str], None]) -> None:
    """Move checkpoints a new run will not continue to checkpoints/superseded/<run>/ and say where they went."""
    try:
        saved = _read_state_json(folders[-1] / STATE_FILE)
        label = saved.get("run_id") or f"recipe-{saved.get('recipe_hash') or 'unknown'}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", str(label)) or str(label) in (".", ".."):
            label = "unknown-run"  # it names a folder: never a path
    except (OSError, ValueError, AttributeError):
        label = "unknown-run"
    aside = root / SUPERSEDED_DIR / str(label)
    n = 1
    while aside.exists():
        n += 1
        aside = root / SUPERSEDED_DIR / f"{label}-{n}"
    aside.mkdir(parents=True)
    for folder in folders:
        os.replace(folder, aside / folder.name)
    say(f"{why}: its checkpoints ({', '.join(f.name for f in folders)}) are kept in {aside} (move one back into "
        f"{root} and use --resume to continue it; `finetune clean --resume-checkpoints {root.parent}` deletes them)")


def warn(message: str) -> None:
    """How a checkpoint removed, recovered or set aside is told by default: a `warning: ` line on stderr, which
    reaches the terminal even while the run's output goes to its log (finetune.cli.console)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def find_resumable(output_dir: str | Path, recipe_hash: str, force: bool,
                   say: Callable[[str], None] = warn) -> Path | None:
    """The checkpoint to continue from: the newest intact one of an unfinished run of the same recipe
    (or of any recipe with `force`, i.e. --resume).

    Interrupted saves are finished or removed, damaged checkpoints are named and removed (the next older one is
    tried), and checkpoints that will not be resumed are moved aside (`_set_aside`), so a new run never mixes its
    checkpoints with an older run's and never drops them silently. `say` tells the user what was done.
    """
    root = checkpoints_dir(output_dir)
    if not _is_folder(root):
        return None
    _recover_interrupted_saves(root, say)
    finished = (root / FINISHED_FILE).exists()
    if not finished:
        for path in reversed(step_dirs(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                state = _read_state_json(path / STATE_FILE)
                saved = state.get("recipe_hash") if isinstance(state, dict) else None
                if force or saved == recipe_hash:
                    return path
                break
            strangers = _strangers(path)
            if strangers:  # not a checkpoint finetune wrote: never deleted, never moved
                say(f"left {path} alone: it is not an intact checkpoint ({problem}) and holds files finetune does not "
                    f"write there ({', '.join(strangers[:3])}); trying the one before")
                continue
            shutil.rmtree(path)
            say(f"checkpoint {path} is damaged ({problem}): removed it; trying the one before")
    left = [p for p in step_dirs(output_dir) if not _strangers(p)]
    if left:
        why = (f"the run in {output_dir} finished" if finished else
               f"{output_dir} holds an unfinished run of another recipe (up to {left[-1].name}); this run starts afresh")
        _set_aside(root, left, why, say)
    (root / FINISHED_FILE).unlink(missing_ok=True)
    return None


def mark_finished(output_dir: str | Path, keep_checkpoints: bool = False) -> None:
    """Record that the run finished, so running the recipe again starts a new run instead of resuming; a finished
    run is never resumed, so its checkpoints are deleted unless the recipe keeps them."""
    root = checkpoints_dir(output_dir)
    if _is_folder(root):
        write_atomic(root / FINISHED_FILE, "finished\n")  # a link planted there is replaced, never written through
        if not keep_checkpoints:
            for path in step_dirs(output_dir):
                shutil.rmtree(path)


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """GradScaler state with tensors turned into numbers, for JSON."""
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_training_state(accelerator, model, optimizer, scheduler, counters: dict[str, Any],
                        output_dir: str | Path, keep: int) -> Path:
    """Write a checkpoint of the whole training state (all processes must call this)."""
    step = counters["step"]
    root = checkpoints_dir(output_dir)
    target = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"  # the same name on every process, so each adds its RNG file to it
    if accelerator.is_main_process:
        for path in (root, tmp, target):
            if is_link(path):
                raise CheckpointError(f"{path} is a symbolic link; finetune does not write or delete through links: "
                                      "remove the link (what it points at is left alone)")
        if tmp.exists():
            if not is_staging(tmp, tmp.name):
                raise CheckpointError(f"{tmp} is in the way of a checkpoint save and finetune did not make it (no "
                                      f"{STAGING_MARKER}): move it away")
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        mark_staging(tmp, tmp.name)
    accelerator.wait_for_everyone()
    rng_tensors, rng_meta = _rng_state()
    rank = accelerator.process_index
    save_file(rng_tensors, str(tmp / f"rng-{rank}.safetensors"))
    (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_meta))
    if accelerator.is_main_process:
        state = accelerator.unwrap_model(model).state_dict()
        # Tied weights (e.g. embeddings shared with a decoder) share storage; safetensors needs copies.
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        if getattr(accelerator, "scaler", None) is not None:  # fp16 on GPU: the loss scale must carry over
            (tmp / "scaler.json").write_text(json.dumps(_plain(accelerator.scaler.state_dict())))
        (tmp / STATE_FILE).write_text(json.dumps(counters, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for path in files:  # the data on disk before the manifest that vouches for it
            fsync_path(path)
        write_manifest(tmp, [p.name for p in files], MANIFEST_FILE)
        fsync_path(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        fsync_path(root)
        for old in step_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_training_state(accelerator, model, optimizer, scheduler, checkpoint: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this process's RNG states; returns the saved counters.

    The checkpoint is intact (`find_resumable` checked it), so a failure here means it does not fit this run
    (a changed model under --resume, say): a CheckpointError that names it.
    """
    try:
        return _load_training_state(accelerator, model, optimizer, scheduler, checkpoint)
    except Exception as e:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: it does not fit this run ({type(e).__name__}: {str(e)[:200]}); "
            f"use another output_dir, or delete the checkpoints with `finetune clean --resume-checkpoints "
            f"{checkpoint.parent.parent}`") from None


def _load_training_state(accelerator, model, optimizer, scheduler, checkpoint: Path) -> dict[str, Any]:
    counters = _read_state_json(checkpoint / STATE_FILE)
    accelerator.unwrap_model(model).load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    optimizer.load_state_dict(
        _optimizer_from_files(load_file(str(checkpoint / "optimizer.safetensors")),
                              _read_state_json(checkpoint / "optimizer.json"))
    )
    scheduler.load_state_dict(_read_state_json(checkpoint / "scheduler.json"))
    if getattr(accelerator, "scaler", None) is not None and (checkpoint / "scaler.json").is_file():
        accelerator.scaler.load_state_dict(_read_state_json(checkpoint / "scaler.json"))
    rank = accelerator.process_index
    rng_file = checkpoint / f"rng-{rank}.safetensors"
    if rng_file.is_file():  # absent when resuming with more processes than were saved
        _set_rng_state(load_file(str(rng_file)), _read_state_json(checkpoint / f"rng-{rank}.json"))
    return counters
