"""`model.checkpoint` as a run's starting point: a pretrained checkpoint, or a fine-tuned model named the way
`finetune predict` takes one (run id, runs:/, models:/, a model folder), found through `finetune.tracking.sources`.

The models layer gets a plain folder (`finetune.models.starting.Start`); the MLflow run records the parent with a
tag and as an input, so the lineage shows in the MLflow UI and in `finetune compare`.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from finetune.errors import CheckpointError
from finetune.models import pretrained
from finetune.models.modeling import METADATA_FILE, read_model_info
from finetune.models.starting import Start
from finetune.tracking.sources import RUN_ID, locate


def names_a_model(checkpoint: str) -> bool:
    """Whether `model.checkpoint` names a fine-tuned model rather than a pretrained checkpoint."""
    if RUN_ID.fullmatch(checkpoint) or checkpoint.startswith(("runs:/", "models:/")):
        return True
    return (Path(checkpoint).expanduser() / METADATA_FILE).is_file()


def resolve_start(checkpoint: str, revision: str | None = None, allow_pickle: bool = False,
                  store: str | None = None) -> Start:
    """Find what `model.checkpoint` names; an MLflow model is unpacked into a folder kept until the process ends.

    store: the tracking URI a run id or models:/ URI is looked up in (the recipe's, `tracking.tracker.tracking_uri`).
    """
    if not names_a_model(checkpoint):
        return Start(pretrained.resolve_checkpoint(checkpoint, revision, allow_pickle))
    try:
        found = locate(checkpoint, store=store)
    except CheckpointError:
        raise
    except Exception as e:  # ModelSourceError and anything MLflow raises while fetching
        raise CheckpointError(f"model.checkpoint: {e}") from None
    folder = found.path
    if found.is_mlflow_model:
        from finetune.tracking.mlflow_model import unpack_model_folder

        folder = Path(tempfile.mkdtemp(prefix="finetune-parent-"))
        atexit.register(shutil.rmtree, folder, True)
        unpack_model_folder(found.path, folder, None)
    if found.version is not None:
        stable = f"models:/{found.name}/{found.version}"  # an alias moves; the version it pointed to does not
    elif found.run_id is not None:
        stable = f"runs:/{found.run_id}/model"
    else:
        stable = str(Path(folder).resolve())
    info = read_model_info(folder)
    return Start(pretrained.ResolvedCheckpoint(stable, Path(folder).resolve(), "finetune model"), info, stable,
                 found.run_id)
