"""The MLflow store a command reads, and refusing to read one that is not there.

An MLflow client creates a SQLite database the first time it touches a `sqlite:///` URI that names none, so
`finetune compare` (or `promote`, `predict RUN_ID`, `serve`, `export RUN_ID`) run from the wrong folder would
silently make an empty `mlflow.db` and report nothing. Read-only commands check first: they never create a
store, and say which one they looked at and how to point at another. Only `finetune run` and `sweep` create
one.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.errors import StoreError
from finetune.tracking.tracker import DEFAULT_TRACKING_URI, tracking_uri


def local_store_file(uri: str) -> Path | None:
    """The file or folder a local store URI names (`sqlite:///mlflow.db`, `file:///...`, a plain path); None for
    servers and databases elsewhere, which exist or fail on their own."""
    if uri.startswith("sqlite:///"):
        rest = uri.removeprefix("sqlite:///").split("?", 1)[0]
        return Path(rest) if rest and rest != ":memory:" else None
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" not in uri:
        return Path(uri)
    return None


def where_from() -> str:
    """Where the tracking URI of a command without a recipe comes from, in words."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "$MLFLOW_TRACKING_URI"
    return f"the default, {DEFAULT_TRACKING_URI} in the current folder"


def existing_store(uri: str | None = None) -> str:
    """The tracking URI (default: `tracking_uri()`), after checking that a local store is there (StoreError if not)."""
    uri = uri or tracking_uri()
    path = local_store_file(uri)
    if path is not None and not path.exists():
        raise StoreError(
            f"no MLflow store at {uri} ({where_from()}): {path.resolve()} does not exist, so nothing was tracked "
            f"there, and this command does not create one. `finetune run` makes the store in the folder it runs "
            f"from: run this command there, or point at the store with MLFLOW_TRACKING_URI (e.g. "
            f"MLFLOW_TRACKING_URI=sqlite:////path/to/mlflow.db; a recipe's tracking.tracking_uri says where its runs went)"
        )
    return uri
