"""`finetune runs` (the output folders, their size and state) and `finetune clean` (delete what finetune wrote)."""

from __future__ import annotations

import json
import sys

from finetune.training.outputs import clean, list_runs


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"


def cmd_runs(root: str, fmt: str) -> int:
    """Print one row per output folder under `root`: path, size, state, MLflow run, recipe."""
    folders = list_runs(root)
    rows = [folder.row() for folder in folders]
    if fmt == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print(f"no output folders in {root}")
        return 0
    headers = {"path": "output folder", "size_mb": "MB", "state": "state", "mlflow_run": "MLflow run", "recipe": "recipe"}
    table = [[str(row[k]) for k in headers] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers.values())]
    for line in [list(headers.values()), *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    print(f"\ntotal {_mb(sum(f.size for f in folders))}; `finetune clean PATH` deletes what finetune "
          "wrote in a folder, `--resume-checkpoints` only its resume checkpoints")
    return 0


def cmd_clean(paths: list[str], resume_only: bool, dry_run: bool) -> int:
    """Delete (or with dry_run list) what finetune wrote in each folder; 2 when a folder was refused. Everything is
    checked before anything is deleted (`finetune.training.outputs.clean`); what has finetune's name but was left
    alone (a link, a folder holding files finetune did not write) is named on stderr."""
    refused = False
    verb = "would delete" if dry_run else "deleted"
    total = 0
    for path in paths:
        for done in clean(path, resume_only, dry_run):
            if done.refused:
                refused = True
                print(f"error: {done.folder}: {done.refused}", file=sys.stderr)
                continue
            for item, size in done.removed:
                total += size
                print(f"{verb} {item} ({_mb(size)})")
            for item, why in done.skipped:
                print(f"warning: left {item} alone: {why}", file=sys.stderr)
            if not done.removed:
                print(f"{done.folder}: nothing of finetune's to delete")
            if done.kept:
                shown = ", ".join(p.name for p in done.kept[:5]) + (", ..." if len(done.kept) > 5 else "")
                print(f"{done.folder}: left alone (finetune did not write them): {shown}")
    print(f"{verb} {_mb(total)} in all")
    return 2 if refused else 0
