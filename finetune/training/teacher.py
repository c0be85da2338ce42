"""The teacher of a distillation recipe: found like any model source, run once over the training texts, cached.

The teacher reads the raw training texts with its own tokenizer, length and settings (a teacher that reads
long texts in windows has its window logits pooled as it would serve them), so student and teacher need
not share a tokenizer. Its outputs become the `teacher_logits` (and `teacher_hidden`) columns of the
training features and are kept on disk under the tokenisation cache, keyed by the teacher's files and the
training data, so neither another epoch nor another run of the recipe computes them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.config.recipe import Recipe
from finetune.data.features import PreparedData, cache_root
from finetune.errors import RecipeError
from finetune.models.bigbird import attention_for_batch, plan_batches
from finetune.models.predictor import Predictor, inference_autocast
from finetune.tasks.distillation import TEACHER_HIDDEN, TEACHER_LOGITS
from finetune.tasks.sequence import batch_texts, pool_windows
from finetune.tracking.tracker import tracking_uri
from finetune.training.speed import teacher_precision

ENCODE_CHUNK = 2048
"""Texts encoded at a time, so the features of a large training set never sit in memory at once."""


def load_teacher(source: str, store: str | None = None) -> tuple[Predictor, Path]:
    """The teacher's Predictor (PyTorch, fp32) from anything `finetune predict` accepts, and where its files are.

    store: the tracking URI a run id or models:/ URI is looked up in (the recipe's).
    """
    from finetune.errors import ModelSourceError
    from finetune.tracking.sources import load_predictor, locate

    try:
        found = locate(source, store=store)
        return load_predictor(found, backend="torch"), found.path
    except ModelSourceError as e:
        raise RecipeError(f"distillation.teacher: {e}") from None


def check_teacher(teacher: Predictor, recipe: Recipe, label_names: list[str] | None, student_hidden: int | None) -> None:
    """Refuse a teacher whose outputs do not mean what the student's mean, naming both sides (the hidden widths only
    when the student's is known: `finetune validate` of a recipe whose checkpoint it could not read)."""
    source, info = recipe.distillation.teacher, teacher.info
    if info.task != recipe.task.type:
        raise RecipeError(f"distillation.teacher: {source} is a {info.task} model; this recipe trains "
                          f"{recipe.task.type}, and a teacher must be of the same task")
    if info.label_names != label_names:
        raise RecipeError(f"distillation.teacher: {source} has the labels {info.label_names}, this recipe "
                          f"{label_names}; they must be the same, in the same order")
    pairs = recipe.data.text_pair_column is not None
    if info.text_pair != pairs:
        raise RecipeError(f"distillation.teacher: {source} reads {'pairs' if info.text_pair else 'single texts'}, "
                          f"this recipe {'pairs' if pairs else 'single texts'}")
    teacher_hidden = teacher.model.config.hidden_size
    if recipe.distillation.hidden_weight and student_hidden is not None and teacher_hidden != student_hidden:
        raise RecipeError(f"distillation.hidden_weight: the teacher's hidden size is {teacher_hidden}, "
                          f"the student's {student_hidden}; hidden states can be matched only when they are the same "
                          "(set hidden_weight: 0)")


def model_digest(path: Path) -> str:
    """A hash of a model folder's weights and configuration (its content, wherever it was downloaded to)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def teacher_lineage(recipe: Recipe) -> dict[str, str]:
    """What the run records about its distillation teacher: where it is, so it can be found again from anywhere
    (`finetune.teacher`: an absolute folder, or a run or registry URI with the version an alias pointed to), and the
    MLflow run that trained it when there is one (`finetune.teacher_run_id`), beside the precision it computed in."""
    from finetune.tracking.sources import MODELS_URI, RUN_ID
    from finetune.training.start import folder_run_id

    source, run_id = recipe.distillation.teacher, None
    if Path(source).expanduser().is_dir():
        folder = Path(source).expanduser().resolve()
        source, run_id = str(folder), folder_run_id(folder, _saved_metrics(folder), tracking_uri(recipe))
    elif RUN_ID.fullmatch(source):
        run_id = source
    elif source.startswith("runs:/"):
        run_id = source.split("/")[1] if RUN_ID.fullmatch(source.split("/")[1]) else None
    elif (match := MODELS_URI.fullmatch(source)) is not None:
        try:
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=tracking_uri(recipe))
            name, alias, number = match.groups()
            version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
            source, run_id = f"models:/{name}/{version.version}", version.run_id
        except Exception:  # the registry cannot be read now: the URI as given
            pass
    return {"finetune.teacher": source, "finetune.teacher_run_id": run_id or "",
            "finetune.teacher_precision": teacher_precision(recipe)}


def _saved_metrics(folder: Path) -> dict[str, float]:
    from finetune.models.modeling import read_model_info

    try:
        return read_model_info(folder).metrics
    except Exception:  # not a finetune model folder (an MLflow model): its MLmodel names the run
        return {}


@torch.inference_mode()
def teacher_outputs(teacher: Predictor, texts: list[str], pairs: list[str] | None, hidden: bool,
                    batch_size: int = 64, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher's logits (and first-token last hidden state) for every text, in order, in eval mode, in fp32 or
    under bf16 autocast (`precision`); returned as float32."""
    task, settings, model = teacher.task, teacher.settings, teacher.model.eval()
    logits_out, hidden_out = [], []
    progress = tqdm(total=len(texts), desc="teacher outputs", disable=len(texts) < 1000)
    for start in range(0, len(texts), ENCODE_CHUNK):
        part = texts[start : start + ENCODE_CHUNK]
        inputs = [list(p) for p in zip(part, pairs[start : start + ENCODE_CHUNK])] if pairs is not None else part
        encoded = task.encode(teacher.tokenizer, inputs, teacher.info.text_pair, teacher.info.max_length, settings)
        features = encoded.features
        rows: list[Any] = [None] * len(features)
        states: list[Any] = [None] * len(features)
        for idx in plan_batches([len(f["input_ids"]) for f in features], batch_size, model.config,
                                teacher.info.pad_to_multiple_of):
            batch = teacher.collator([features[i] for i in idx])
            with attention_for_batch(model, batch["input_ids"]), inference_autocast(precision):
                out = model(**batch, output_hidden_states=hidden)
            for j, i in enumerate(idx):
                rows[i] = out.logits[j].float().numpy()
                if hidden:
                    states[i] = out.hidden_states[-1][j, 0].float().numpy()
        if settings.long_inputs == "chunk":  # one row per text, as the teacher answers when it serves
            rows = list(pool_windows(rows, encoded.owner, len(part), settings.chunk_pooling))
            if hidden:
                states = list(pool_windows(states, encoded.owner, len(part), "mean"))
        logits_out += rows
        hidden_out += states
        progress.update(len(part))
    progress.close()
    return np.stack(logits_out).astype(np.float32), (np.stack(hidden_out).astype(np.float32) if hidden else None)


def add_teacher_outputs(data: PreparedData, recipe: Recipe, student_hidden: int) -> PreparedData:
    """The prepared data with the teacher's outputs on every training example as feature columns (cached)."""
    cfg = recipe.distillation
    teacher, folder = load_teacher(cfg.teacher, tracking_uri(recipe))
    check_teacher(teacher, recipe, data.label_names, student_hidden)
    if len(data.train) != len(data.raw_train):
        raise RecipeError("distillation needs one training feature per training text (task.long_inputs: truncate)")
    hidden = bool(cfg.hidden_weight)
    precision = teacher_precision(recipe)
    key = hashlib.sha256(json.dumps({
        "teacher": model_digest(folder), "train": data.raw_train._fingerprint,
        "columns": [recipe.data.text_column, recipe.data.text_pair_column], "hidden": hidden, "version": 1,
        **({"precision": precision} if precision != "fp32" else {}),  # fp32 keeps the key caches made before it
    }, sort_keys=True).encode()).hexdigest()[:24]
    cached = cache_root().parent / "teacher" / f"{key}.npz"
    if cached.is_file():
        saved = np.load(cached)
        logits, states = saved["logits"], (saved["hidden"] if hidden else None)
        print(f"teacher outputs of {cfg.teacher} ({precision}) on {len(logits)} training examples: from cache")
    else:
        texts, pairs = batch_texts(data.raw_train[:], recipe.data)
        logits, states = teacher_outputs(teacher, texts, pairs, hidden, precision=precision)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".npz", delete=False) as f:
            np.savez(f, logits=logits, **({"hidden": states} if hidden else {}))
        os.replace(f.name, cached)  # written whole, then renamed: an interrupted run leaves no half file
        print(f"teacher outputs of {cfg.teacher} ({precision}) on {len(logits)} training examples: computed once, "
              "cached")
    data.train = data.train.add_column(TEACHER_LOGITS, logits.tolist())
    if hidden:
        data.train = data.train.add_column(TEACHER_HIDDEN, states.tolist())
    return data

