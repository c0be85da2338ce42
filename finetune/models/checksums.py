"""Manifests of files with their sizes and SHA-256 digests, writes that survive a crash, and the staging marker.

A model folder records `checksums.json` and a training-state checkpoint `manifest.json`, each written after
every file it lists and synced to disk before the folder is renamed into place; a reader compares sizes and
digests before trusting anything, so a truncated or altered file is named instead of half-loaded.

A folder finetune writes beside its target before renaming it into place (`.best-new`, `.step-N.tmp`) carries
`STAGING_MARKER`, so cleaning up after a crash deletes only folders finetune made, never a user's own folder
that happens to have a similar name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from finetune.files import RefusedDocument, is_link, read_json, write_atomic

ALGORITHM = "sha256"
STAGING_MARKER = ".finetune-staging.json"
"""In a folder finetune is writing before it renames it into place: what it is for (`mark_staging`)."""


def digest(path: Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a folder's fsync makes its renames and new names durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the folder last."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def write_manifest(folder: Path, files: Iterable[str], name: str) -> Path:
    """Record the size and digest of `files` (paths relative to `folder`) in `folder/name`, synced to disk."""
    folder = Path(folder)
    entries = {rel: {"size": (folder / rel).stat().st_size, ALGORITHM: digest(folder / rel)} for rel in sorted(files)}
    # Atomic and never through a link planted at `name` (write_atomic syncs the file before the rename).
    return write_atomic(folder / name, json.dumps({"algorithm": ALGORITHM, "files": entries}, indent=2))


def read_manifest(folder: Path, name: str) -> dict[str, dict] | None:
    """The files a manifest lists, None when the folder has no manifest; ValueError when it is unreadable."""
    path = Path(folder) / name
    if is_link(path):
        raise ValueError(f"{name} is a symbolic link; a manifest is a file of the folder itself")
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"not a {ALGORITHM} manifest")
        for rel, entry in files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:  # it may only speak of files inside the folder
                raise ValueError(f"it lists {rel[:100]!r}, outside the folder")
            int(entry["size"]), str(entry[ALGORITHM])
    except RefusedDocument as e:
        raise ValueError(f"{path.name} is refused: {e}") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path.name} is unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    return files


def manifest_problem(folder: Path, name: str, required: Iterable[str] = ()) -> str | None:
    """The first file that does not match the manifest (missing, another size, another digest), or None.

    A folder without a manifest has nothing to compare with: None (not verified). `required` files must be listed.
    """
    folder = Path(folder)
    try:
        files = read_manifest(folder, name)
    except ValueError as e:
        return str(e)
    if files is None:
        return None
    for rel in required:
        if rel not in files:
            return f"{name} does not list {rel}"
    for rel, entry in files.items():
        path = folder / rel
        if is_link(path):
            return f"{rel} is a symbolic link, not the file that was saved"
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != int(entry["size"]):
            return f"{rel} is {size} bytes, {entry['size']} were written"
        if digest(path) != entry[ALGORITHM]:
            return f"{rel} does not match the {ALGORITHM} checksum recorded when it was saved"
    return None


def record_files(folder: Path, files: Iterable[str], name: str) -> bool:
    """Re-record the size and digest of `files` in an existing manifest (a file finetune rewrote, such as
    finetune.json after calibration), keeping its other entries; False when the folder has no manifest."""
    folder = Path(folder)
    listed = read_manifest(folder, name)
    if listed is None:
        return False
    entries = dict(listed) | {rel: {"size": (folder / rel).stat().st_size, ALGORITHM: digest(folder / rel)}
                              for rel in files}
    write_atomic(folder / name, json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, indent=2))
    return True


def mark_staging(folder: Path, purpose: str) -> None:
    """Say in `folder` that finetune made it to become `purpose` (a folder name), so a crash's leftover is known."""
    write_atomic(Path(folder) / STAGING_MARKER, json.dumps({"created_by": "finetune", "for": purpose}), replace=False)


def is_staging(folder: Path, purpose: str) -> bool:
    """Whether `folder` is a real folder (not a link) that `mark_staging` marked as finetune's, for `purpose`."""
    folder = Path(folder)
    if is_link(folder) or not folder.is_dir() or is_link(folder / STAGING_MARKER):
        return False
    try:
        marker = read_json(folder / STAGING_MARKER, max_bytes=4096)
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("created_by") == "finetune" and marker.get("for") == purpose
