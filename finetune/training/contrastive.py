"""`training.method: contrastive`: the pair phase that trains the encoder before the loop trains the head.

SetFit's method (Tunstall et al., 2022) for few labels: sample pairs of training texts, positive when they share a
class (multi_label: a label) and negative when not, and fine-tune the encoder as a sentence-transformers body
(the checkpoint's transformer plus the pooling its head will read) so that same-class texts embed close together.
The trained encoder's weights then go into the run's ordinary task model (`PairPhase.install`), before it is frozen
and its outputs cached, and the loop trains the head as the recipe says (with `training.freeze: encoder`, the head
alone on the frozen embeddings, as SetFit's logistic regression does). So the saved model is an ordinary model
folder: calibrated, served, evaluated and exported like any other.

The body, its tokenisation and the losses are sentence-transformers'. The pair sampling is written here (SetFit
keeps it in its own package, which lags transformers releases), and so is the small optimisation loop: the run
already owns the device, the thread budget (finetune.threads) and the seeds, and SentenceTransformerTrainer would
set up an Accelerator state and reporting callbacks (MLflow's among them) of its own inside our run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from finetune.config.recipe import Recipe
from finetune.data.loading import label_sentences
from finetune.errors import DataError, TrainingDiverged
from finetune.families import family_of
from finetune.files import RefusedDocument, read_json
from finetune.training.speed import pair_phase_bf16

log = logging.getLogger(__name__)

__all__ = ["PairPhase", "body_pooling", "sample_pairs", "train_body"]

ST_POOLING = {"mean": "mean", "first": "cls"}
"""model.pooling -> the sentence-transformers pooling mode that reads the same vector."""


def body_pooling(path: str | Path, asked: str) -> str:
    """The pooling the pair phase and the head use: `asked` (model.pooling) unless it is auto, then the checkpoint's
    own sentence-transformers pooling (1_Pooling/config.json, as its modules.json names it): mean for the offline
    MiniLM; mean for a checkpoint without one too, as SetFit does."""
    if asked != "auto":
        return asked
    folder = Path(path)
    try:
        modules = read_json(folder / "modules.json")
        pooling_dir = next(m["path"] for m in modules if m.get("type", "").endswith("Pooling"))
        config = read_json(folder / pooling_dir / "config.json")
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError, RefusedDocument):
        return "mean"
    if config.get("pooling_mode_cls_token") and not config.get("pooling_mode_mean_tokens"):
        return "first"
    return "mean"


def sample_pairs(labels: np.ndarray, iterations: int, rng: np.random.Generator,
                 sampling: str = "random") -> list[tuple[int, int, float]]:
    """SetFit's pairs, iterations x examples of each kind (positive: same class, multi_label sharing a label; negative:
    another class, sharing none). random: in each of `iterations` rounds, every example gets one positive and one
    negative partner drawn at random; an example with no possible partner of a kind gets none of that kind. unique
    (SetFit 1.2's sampler): every distinct pair, an example with itself included as a positive, in a shuffled order,
    cycled until each kind has its count, so every pair is seen about equally often. Returns (index, index, 1.0 or 0.0)
    triples."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        same = labels[:, None] == labels[None, :]
    else:
        hot = labels > 0
        same = (hot.astype(np.int64) @ hot.T.astype(np.int64)) > 0
    if sampling == "unique":
        return _unique_pairs(same, iterations, rng)
    np.fill_diagonal(same, False)
    other = ~same
    np.fill_diagonal(other, False)
    positives = [np.flatnonzero(row) for row in same]
    negatives = [np.flatnonzero(row) for row in other]
    pairs: list[tuple[int, int, float]] = []
    for _ in range(iterations):
        for i in range(len(labels)):
            if len(positives[i]):
                pairs.append((i, int(rng.choice(positives[i])), 1.0))
            if len(negatives[i]):
                pairs.append((i, int(rng.choice(negatives[i])), 0.0))
    return pairs


def _unique_pairs(same: np.ndarray, iterations: int, rng: np.random.Generator) -> list[tuple[int, int, float]]:
    # Written after SetFit 1.2's ContrastiveDataset (num_iterations given), which shuffles with a fixed seed of its
    # own; here training.seed shuffles, as for the random partners.
    n = len(same)
    rows, cols = np.triu_indices(n)
    order = rng.permutation(len(rows))
    rows, cols = rows[order], cols[order]
    positive = same[rows, cols]  # the diagonal: itself, a positive wherever the example has a class or a label
    wanted = iterations * n
    pairs: list[tuple[int, int, float]] = []
    for target, kind in ((1.0, positive), (0.0, ~positive & (rows != cols))):
        found = np.flatnonzero(kind)
        if len(found):
            taken = found[np.arange(wanted) % len(found)]
            pairs += [(int(i), int(j), target) for i, j in zip(rows[taken], cols[taken])]
    return pairs


@dataclass
class PairPhase:
    """What the pair phase produced: the encoder's weights, and the facts the run reports and logs."""

    weights: dict[str, torch.Tensor]
    pooling: str
    pairs: int
    steps: int
    loss: str
    seconds: float
    precision: str = "fp32"
    """How the pair phase computed: fp32 or bf16 autocast (the run's training precision, `pair_phase_bf16`)."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean loss since the previous entry), every training.logging_steps steps and at the last."""
    label_sentences: int = 0
    """How many of the examples were training.contrastive.label_template's sentences."""
    sampling: str = "random"
    """training.contrastive.sampling: how the pairs' partners were picked."""

    @property
    def note(self) -> str:
        """One line for the run header, the model card and MLflow: how the encoder was trained."""
        last = f", last loss {self.losses[-1][1]:.4f}" if self.losses else ""
        named = f", {self.label_sentences:,} of the examples label-name sentences" if self.label_sentences else ""
        unique = " (every distinct pair, cycled)" if self.sampling == "unique" else ""
        return (f"method contrastive: {self.pairs:,} pairs{unique}, {self.steps:,} steps, loss {self.loss}, pooling "
                f"{self.pooling}, {self.precision}{last}, {self.seconds:.1f} s{named}; then the head trained as the "
                "training section says.")

    def install(self, model: Any) -> None:
        """Put the trained encoder weights into the run's task model (its encoder, found by the family)."""
        encoder = family_of(model.config).encoder(model)
        missing, unexpected = encoder.load_state_dict(self.weights, strict=False)
        # A pooler may be on one side only (RoBERTa's task models have none, its base model has one): the head's.
        missing, unexpected = [n for n in missing if "pooler" not in n], [n for n in unexpected if "pooler" not in n]
        if missing or unexpected:
            raise RuntimeError(f"the pair phase's encoder does not fit the task model's: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")

    def log(self, tracker: Any) -> None:
        """The pair phase's loss curve as `contrastive/loss`, and its size, in the run's MLflow metrics."""
        for step, value in self.losses:
            tracker.log_metrics({"contrastive/loss": value}, step=step)
        tracker.log_metrics({"contrastive/pairs": self.pairs, "contrastive/steps": self.steps,
                             "contrastive/seconds": self.seconds}, step=0)


def _body(path: str, pooling: str, recipe: Recipe, device: torch.device) -> Any:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    kwargs = {"trust_remote_code": True} if recipe.model.trust_remote_code else {}
    # Batches are not padded to a multiple here, unlike the loop's (speed.pad_multiple): measured on the MiniLM under
    # bf16 autocast (2026-12-07, Zen 4), padding SST-2's pairs to 16 tokens made the pair phase 10% slower, and
    # BBC's (256 tokens) were no faster: nearly every batch of pairs holds a text cut at the full length anyway.
    transformer = Transformer(str(path), max_seq_length=recipe.model.max_length, model_kwargs=dict(kwargs),
                              config_kwargs=dict(kwargs), processor_kwargs=dict(kwargs))
    pool = Pooling(transformer.get_embedding_dimension(), ST_POOLING[pooling])
    return SentenceTransformer(modules=[transformer, pool], device=str(device))


def _loss(name: str, body: Any) -> Any:
    from sentence_transformers.sentence_transformer import losses

    return losses.CosineSimilarityLoss(body) if name == "cosine" else losses.CoSENTLoss(body)


def train_body(recipe: Recipe, texts: Sequence[str], labels: Any, path: str | Path, device: torch.device,
               threads: Any = None, label_names: list[str] | None = None) -> PairPhase:
    """Run the pair phase on the training texts and their encoded labels (class ids, or multi-hot rows); returns the
    trained encoder's weights. Seeded by training.seed: the same recipe samples the same pairs and trains the same
    weights. `label_names`: the classes, for the note's count of label sentences among the texts."""
    from transformers import get_linear_schedule_with_warmup

    cfg, pair_cfg = recipe.training, recipe.training.contrastive
    rng = np.random.default_rng(cfg.seed)
    pairs = sample_pairs(np.asarray(labels), pair_cfg.iterations, rng, pair_cfg.sampling)
    if not pairs:
        raise DataError("training.method: contrastive found no pairs to train on: the training split needs at least "
                         "two examples of one class, or of two classes")
    order = rng.permutation(len(pairs))
    if pair_cfg.max_pairs is not None:
        order = order[:pair_cfg.max_pairs]
    pooling = body_pooling(path, recipe.model.pooling)
    torch.manual_seed(cfg.seed)
    body = _body(str(path), pooling, recipe, device)
    body.train()
    loss_fn = _loss(pair_cfg.loss, body)
    optimizer = torch.optim.AdamW(body.parameters(), lr=pair_cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(order) / pair_cfg.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.1 * steps), steps)
    texts = list(texts)
    bf16 = pair_phase_bf16(recipe)  # decided once: the autocast below and the note say the same
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    started, window, losses = time.perf_counter(), [], []
    for step in range(steps):
        if threads is not None:
            threads.apply()
        batch = [pairs[k] for k in order[step * pair_cfg.batch_size:(step + 1) * pair_cfg.batch_size]]
        left = _features(body, [texts[i] for i, _, _ in batch], device)
        right = _features(body, [texts[j] for _, j, _ in batch], device)
        with autocast:  # the forward and the loss; the backward pass follows autocast's casts by itself
            loss = loss_fn([left, right], torch.tensor([t for _, _, t in batch], device=device))
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(body.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == steps:
            losses.append((step + 1, float(np.mean(window))))
            window = []
            if not math.isfinite(losses[-1][1]):
                raise TrainingDiverged(f"training.contrastive: the pair loss is not a finite number at step {step + 1}; "
                                 "try a lower training.contrastive.learning_rate")
    weights = {k: v.detach().cpu().clone() for k, v in body[0].auto_model.state_dict().items()}
    phase = PairPhase(weights, pooling, len(order), steps, pair_cfg.loss, time.perf_counter() - started,
                      "bf16 autocast" if bf16 else "fp32", losses, len(label_sentences(recipe, label_names)),
                      pair_cfg.sampling)
    log.info(phase.note)
    return phase


def _features(body: Any, texts: list[str], device: torch.device) -> dict[str, Any]:
    features = body.preprocess(texts)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def label_sentences_line(recipe: Recipe, label_names: list[str]) -> str | None:
    """`finetune validate`'s line on the training examples training.contrastive.label_template adds (None: none), with
    the first one, so the user reads what the template makes of the names."""
    sentences = label_sentences(recipe, label_names)
    if not sentences:
        return None
    return (f"  of which label sentences: {len(sentences)} ({recipe.training.contrastive.label_examples} per class, "
            f"e.g. {sentences[0][0]!r})")  # repr: a name's control characters print as escapes


FEW_PER_CLASS = 64
"""At most this many training examples in every class (or FEW_TOTAL in all) make `finetune validate` suggest the
contrastive method: SetFit's study (8 to 64 per class) and this project's (full fine-tuning of the MiniLM reached 0.78
on SST-2 from 500 sentences, BENCHMARKS.md) are where it pays."""
FEW_TOTAL = 500


def few_labels_hint(recipe: Recipe, counts: dict[str, int]) -> str | None:
    """`finetune validate`'s line when the training split is small enough that training.method: contrastive is
    likely the better choice (a standard-method classification or multi_label recipe on single texts); None otherwise.
    `counts`: the examples of each class (multi_label: carrying each label) in the training split."""
    from finetune.config.recipe import CONTRASTIVE_TASKS

    if (recipe.training.method != "standard" or recipe.task.type not in CONTRASTIVE_TASKS or not counts
            or recipe.data.text_pair_column is not None):
        return None
    values = sorted(counts.values())
    if values[-1] > FEW_PER_CLASS and sum(values) > FEW_TOTAL:
        return None
    per = f"{values[0]}" if values[0] == values[-1] else f"{values[0]} to {values[-1]}"
    kind, kinds = ("label", "labels") if recipe.task.type == "multi_label" else ("class", "classes")
    return (f"few labels: {per} per {kind} ({len(values)} {kinds}); training.method: contrastive usually beats full "
            "fine-tuning here, more so with training.contrastive.label_template where the class names are words "
            "(docs/guides/few-labels.md)")
