"""Training-state checkpoints: everything needed to continue an interrupted run exactly.

A checkpoint is a folder `output_dir/checkpoints/step-<N>/` holding the model weights, the optimizer
and scheduler state (and the fp16 gradient scaler's, on GPUs), every process's random-number states, the loop counters and the MLflow run id.
Written by hand rather than with `accelerator.save_state` because that pickles the optimizer and RNG
states, and loading a pickle can run code: here tensors go to safetensors and the rest to JSON, so
resuming never unpickles anything. Each checkpoint is written to a temporary folder and renamed into
place, and only the newest `keep` are kept, so a crash mid-write never destroys the last good one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
FINISHED_FILE = "FINISHED"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = []
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def find_resumable(output_dir: str | Path, recipe_hash: str, force: bool) -> Path | None:
    """The checkpoint to continue from: the newest one of an unfinished run of the same recipe
    (or of any recipe with `force`, i.e. --resume). Checkpoints that will not be resumed are removed,
    so a new run never mixes its checkpoints with an older run's."""
    latest = latest_checkpoint(output_dir)
    root = checkpoints_dir(output_dir)
    if latest is not None and not (root / FINISHED_FILE).exists():
        saved = json.loads((latest / STATE_FILE).read_text()).get("recipe_hash")
        if force or saved == recipe_hash:
            return latest
    if root.exists():
        shutil.rmtree(root)
    return None


def mark_finished(output_dir: str | Path) -> None:
    """Record that the run finished, so running the recipe again starts a new run instead of resuming."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        (root / FINISHED_FILE).write_text("finished\n")


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
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in sorted(
            (p for p in root.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: int(p.name.split("-")[1])
        )[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_training_state(accelerator, model, optimizer, scheduler, checkpoint: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this process's RNG states; returns the saved counters."""
    counters = json.loads((checkpoint / STATE_FILE).read_text())
    accelerator.unwrap_model(model).load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    optimizer.load_state_dict(
        _optimizer_from_files(load_file(str(checkpoint / "optimizer.safetensors")),
                              json.loads((checkpoint / "optimizer.json").read_text()))
    )
    scheduler.load_state_dict(json.loads((checkpoint / "scheduler.json").read_text()))
    if getattr(accelerator, "scaler", None) is not None and (checkpoint / "scaler.json").is_file():
        accelerator.scaler.load_state_dict(json.loads((checkpoint / "scaler.json").read_text()))
    rank = accelerator.process_index
    rng_file = checkpoint / f"rng-{rank}.safetensors"
    if rng_file.is_file():  # absent when resuming with more processes than were saved
        _set_rng_state(load_file(str(rng_file)), json.loads((checkpoint / f"rng-{rank}.json").read_text()))
    return counters
