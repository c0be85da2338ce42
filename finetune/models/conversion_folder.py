"""Where `finetune convert` writes: a folder beside the target, checked, then moved into place with its report.

Both conversions (`--to bigbird`, `--to fewer-layers`) build the new checkpoint in a hidden folder next to the
target, so a conversion that fails its check leaves nothing half-written under the target's name, and the move
into place is one rename on the same file system. A link at the target is refused (with or without --overwrite:
finetune never writes or deletes through one), and a folder replaced with --overwrite is moved aside first and
deleted only once the new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.errors import ConversionError
from finetune.files import RefusedWrite, refuse_link, write_atomic
from finetune.models.modeling import current_umask, usual_file_modes

REPORT_FILE = "conversion.json"


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that is a link or a file, and a target folder that holds anything unless the user passed
    --overwrite."""
    try:
        refuse_link(target, "the target folder")
    except RefusedWrite as e:
        raise ConversionError(str(e)) from None
    if target.exists() and not target.is_dir():
        raise ConversionError(f"{target} is a file, not a folder; choose a folder")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"{target} exists and is not empty; choose another folder or pass --overwrite")


def checked_source(source: str, target: str | Path, overwrite: bool, allow_pickle: bool) -> tuple[Path, Any, Any]:
    """What every conversion starts with: the target checked (`check_target`), then the source resolved like a
    recipe's model.checkpoint, its weights' format checked and its config loaded. Returns (target, resolved, config)."""
    from finetune.models.pretrained import check_weights_format, load_config, resolve_checkpoint

    target = Path(target)
    check_target(target, overwrite)
    resolved = resolve_checkpoint(source, allow_pickle=allow_pickle)
    check_weights_format(resolved.path, allow_pickle)
    return target, resolved, load_config(resolved)


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new hidden folder beside `target`, removed on the way out whatever happened (after `publish` it is gone)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, target: Path, report: dict[str, Any], started: float) -> dict[str, Any]:
    """Write the report (with the conversion's seconds since `started`) and move the checked folder into place."""
    report["seconds"] = round(time.perf_counter() - started, 2)
    write_atomic(tmp / REPORT_FILE, json.dumps(report, indent=2, ensure_ascii=False))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the checkpoint is an ordinary folder
    usual_file_modes(tmp)  # and its files too (safetensors writes its weights 0600)
    check_target(target, overwrite=True)  # again: a link may have appeared while the conversion ran
    old = None
    if target.exists() and any(target.iterdir()):
        # Aside, not deleted, until the new folder is in place: a failure between the two loses neither.
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-replaced-"))
        os.replace(target, old / target.name)
    os.replace(tmp, target)  # an empty folder there is replaced; a link would be too, never followed
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return report
