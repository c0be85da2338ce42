"""Where `finetune convert` writes: a folder beside the target, checked, then moved into place with its report.

Both conversions (`--to bigbird`, `--to fewer-layers`) build the new checkpoint in a hidden folder next to the
target, so a conversion that fails its check leaves nothing half-written under the target's name, and the move
into place is one rename on the same file system.
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

REPORT_FILE = "conversion.json"


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target folder that holds anything, unless the user passed --overwrite."""
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"{target} exists and is not empty; choose another folder or pass --overwrite")


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
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the checkpoint is an ordinary folder
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return report
