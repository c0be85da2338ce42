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
    run_id = found.run_id or folder_run_id(found.path, info.metrics, store)
    return Start(pretrained.ResolvedCheckpoint(stable, Path(folder).resolve(), "finetune model"), info, stable, run_id)


def folder_run_id(folder: Path | str, metrics: dict[str, float] | None = None, store: str | None = None) -> str | None:
    """The MLflow run that trained a model folder, when the folder tells: a downloaded MLflow model names it in its
    MLmodel file; a run's `best/` folder through its output folder's marker (`.finetune-run.json`), checked against
    the run's logged evaluation loss when the store can be read (a rerun that failed before its first evaluation
    has marked the folder with its own run, though best/ is still the earlier run's). None when nothing says."""
    from finetune.files import read_yaml
    from finetune.training.outputs import BEST_DIR, read_marker

    folder = Path(folder).resolve()
    if (folder / "MLmodel").is_file():
        try:
            found = read_yaml(folder / "MLmodel").get("run_id")
        except Exception:  # unreadable or not a mapping: nothing said
            return None
        return found if isinstance(found, str) and RUN_ID.fullmatch(found) else None
    marker = read_marker(folder.parent) if folder.name == BEST_DIR else None
    run_id = (marker or {}).get("mlflow_run_id")
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        return None
    trained = _logged_loss(run_id, (metrics or {}).get("loss"), store)
    if trained is None:  # the store cannot tell: trust only a run that finished in that folder
        return run_id if marker.get("state") == "finished" else None
    return run_id if trained else None


def _logged_loss(run_id: str, loss: float | None, store: str | None) -> bool | None:
    """Whether the run logged this evaluation loss (the best model's); None when it cannot be checked."""
    if loss is None:
        return None
    try:
        import mlflow

        from finetune.tracking.store import existing_store

        client = mlflow.MlflowClient(tracking_uri=existing_store(store))
        history = client.get_metric_history(run_id, "eval/loss")
    except Exception:  # no store here, a server away, a run another store holds
        return None
    return any(abs(m.value - loss) <= 1e-6 * max(1.0, abs(loss)) for m in history)
