"""Manifests of files with their sizes and SHA-256 digests, and writes that survive a crash.

A model folder records `checksums.json` and a training-state checkpoint `manifest.json`, each written after
every file it lists and synced to disk before the folder is renamed into place; a reader compares sizes and
digests before trusting anything, so a truncated or altered file is named instead of half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

ALGORITHM = "sha256"


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
    path = folder / name
    with open(path, "w") as f:
        json.dump({"algorithm": ALGORITHM, "files": entries}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_manifest(folder: Path, name: str) -> dict[str, dict] | None:
    """The files a manifest lists, None when the folder has no manifest; ValueError when it is unreadable."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"not a {ALGORITHM} manifest")
        for rel, entry in files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:  # it may only speak of files inside the folder
                raise ValueError(f"it lists {rel[:100]!r}, outside the folder")
            int(entry["size"]), str(entry[ALGORITHM])
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
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != int(entry["size"]):
            return f"{rel} is {size} bytes, {entry['size']} were written"
        if digest(path) != entry[ALGORITHM]:
            return f"{rel} does not match the {ALGORITHM} checksum recorded when it was saved"
    return None
