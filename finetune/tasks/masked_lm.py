"""Continued pretraining: masked-language modelling on unlabelled text, as BERT was pretrained.

Texts are tokenised once and (with `task.pack_sequences`) packed into sequences of `model.max_length`
tokens, each token carrying the id of the word it belongs to. The collator masks every training batch
as it is formed: `task.mlm_probability` of the words (all their pieces together with
`task.whole_word_mask`) become targets, and of the target tokens 80% are replaced by [MASK], 10% by a
random token and 10% kept. The masks are drawn from a generator seeded by the batch itself, and batches
are drawn anew every epoch, so each epoch masks differently (RoBERTa's dynamic masking) while a resumed
run masks exactly as the uninterrupted one did: Accelerate collates one batch ahead of the step that
trains on it, and a resumed run skips batches without collating them, so masks drawn from a running
generator would shift. The held-out share is masked once while its features are made, with a fixed seed,
so its perplexity is comparable between evaluations and runs.

The result is a checkpoint to fine-tune (`model.checkpoint: runs/<name>/best`), not a model that answers:
predict, serve and export refuse it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import finetune.tasks.metrics as M
from finetune.families import family_of
from finetune.tasks.base import IGNORE_INDEX, Encoded, FeatureContext, InputError, Reference, Task, TaskSettings, nfc

MASK_SHARE = 0.8
"""Of the target tokens, the share replaced by the mask token (BERT's rule) ..."""
RANDOM_SHARE = 0.1
"""... the share replaced by a random token; the rest stay as they are."""
EVAL_MASK_SEED = 20_190_424
"""Seeds the masks of evaluation and test sequences (never the training seed, so runs with different seeds are
scored on the same masked tokens)."""
NO_WORD = -1
"""Word id of tokens that are never masked: [CLS], [SEP] (also between packed texts) and padding."""


def replacement_ids(tokenizer: Any) -> Any:
    """Token ids a target may be replaced with at random: the whole vocabulary except special tokens."""
    import torch

    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


def mask_tokens(input_ids: Any, word_ids: Any, probability: float, mask_token_id: int, replacements: Any,
                generator: Any = None) -> tuple[Any, Any]:
    """Masked inputs and MLM labels for a padded batch: whole words chosen with `probability`, then 80/10/10.

    `word_ids` (batch x length) numbers the words of each row from 0; tokens with `NO_WORD` are never chosen.
    Every row with at least one word gets at least one target (its word with the smallest draw), so no
    sequence, and no batch, is without a loss. `generator` None draws from torch's global generator.

    Hand-written because transformers 5's DataCollatorForLanguageModeling, with whole_word_mask, drops the
    random and kept tokens (it sets mask_replace_prob to 1) and finds words from character offsets, which
    makes "film." or "don't" one word; and its seeded generator runs on across calls, so evaluation masks
    would change from one evaluation to the next.
    """
    import torch

    maskable = word_ids >= 0
    rows = input_ids.shape[0]
    words = int(word_ids.max().item()) + 1 if maskable.any() else 1
    index = word_ids.clamp(min=0)
    draws = torch.rand((rows, words), generator=generator)
    present = torch.zeros((rows, words), dtype=torch.bool).scatter_(1, index, maskable)
    draws = draws.masked_fill(~present, 2.0)  # absent word ids are never chosen
    chosen = draws < probability
    empty = present.any(dim=1) & ~(chosen & present).any(dim=1)
    if empty.any():
        chosen[empty, draws[empty].argmin(dim=1)] = True
    targets = chosen.gather(1, index) & maskable
    labels = input_ids.masked_fill(~targets, IGNORE_INDEX)
    roll = torch.rand(input_ids.shape, generator=generator)
    to_mask = targets & (roll < MASK_SHARE)
    to_random = targets & (roll >= MASK_SHARE) & (roll < MASK_SHARE + RANDOM_SHARE)
    picks = replacements[torch.randint(len(replacements), input_ids.shape, generator=generator)]
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = picks[to_random]
    return masked, labels


def split_into_sequences(tokenizer: Any, texts: Sequence[str], max_length: int, pack: bool,
                         whole_words: bool) -> list[tuple[list[int], list[int]]]:
    """(token ids, word ids) of the sequences a batch of texts makes, special tokens added.

    Packed: the texts' tokens one after the other (the separator token between two texts) cut into pieces of
    max_length less the special tokens; otherwise each text alone, a long one cut into consecutive pieces. Word
    ids are numbered from 0 in each sequence (`NO_WORD` for special tokens); without whole words every token is
    a word of its own.
    """
    prefix, suffix = special_template(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
    if whole_words and not getattr(encoded, "is_fast", False):
        raise ValueError("task.whole_word_mask needs a fast tokenizer (it reads the words of each token from it); "
                         "this checkpoint's tokenizer is not one: set task.whole_word_mask: false")
    separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pieces: list[tuple[list[int], list[int]]] = []
    stream_ids: list[int] = []
    stream_words: list[int] = []
    base = 0
    for i, ids in enumerate(encoded["input_ids"]):
        if not ids:
            continue
        if whole_words:
            words = [base + (w or 0) for w in encoded.word_ids(i)]
        else:
            words = list(range(base, base + len(ids)))
        base = words[-1] + 1
        if not pack:
            pieces += [(ids[s : s + room], words[s : s + room]) for s in range(0, len(ids), room)]
            continue
        if stream_ids and separator is not None:
            stream_ids.append(separator)
            stream_words.append(NO_WORD)
        stream_ids += ids
        stream_words += words
    if pack:
        pieces = [(stream_ids[s : s + room], stream_words[s : s + room]) for s in range(0, len(stream_ids), room)]
    sequences = []
    for ids, words in pieces:
        numbered: dict[int, int] = {}
        inner = [NO_WORD if w == NO_WORD else numbered.setdefault(w, len(numbered)) for w in words]
        sequences.append((prefix + ids + suffix, [NO_WORD] * len(prefix) + inner + [NO_WORD] * len(suffix)))
    return sequences


def special_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after a single text ([CLS] and [SEP] for BERT).

    Read from how it encodes one ordinary token, because transformers 5's fast tokenizers add them only while
    encoding text (their post-processor); there is no call that adds them to ids already tokenised.
    """
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(full)) if full[i : i + len(probe)] == probe), None)
    if not probe or start is None:
        raise ValueError("cannot tell where this tokenizer puts its special tokens around a text")
    return full[:start], full[start + len(probe):]


def pad_rows(rows: Sequence[Sequence[int]], length: int, value: int, side: str) -> Any:
    """Rows of ints padded with `value` to `length`, on the tokenizer's padding side, as a tensor."""
    import torch

    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        row = torch.as_tensor(list(row), dtype=torch.long)
        if side == "left":
            out[i, length - len(row):] = row
        else:
            out[i, : len(row)] = row
    return out


class MaskingCollator:
    """Pads a batch and masks it; a batch that already has labels (evaluation, masked once) is only padded."""

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None, probability: float):
        if tokenizer.mask_token_id is None:
            raise ValueError("masked_lm needs a tokenizer with a mask token; this checkpoint's tokenizer has none")
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of
        self.probability = probability
        self.replacements = replacement_ids(tokenizer)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from transformers.data.data_collator import pad_without_fast_tokenizer_warning

        rows = [dict(f) for f in features]
        words = [row.pop("word_ids") for row in rows]
        labels = [row.pop("labels") for row in rows] if "labels" in rows[0] else None
        batch = dict(pad_without_fast_tokenizer_warning(self.tokenizer, rows, return_tensors="pt",
                                                        pad_to_multiple_of=self.pad_to_multiple_of))
        length, side = batch["input_ids"].shape[1], self.tokenizer.padding_side
        if labels is not None:
            batch["labels"] = pad_rows(labels, length, IGNORE_INDEX, side)
            return batch
        word_ids = pad_rows(words, length, NO_WORD, side)
        batch["input_ids"], batch["labels"] = mask_tokens(batch["input_ids"], word_ids, self.probability,
                                                          self.tokenizer.mask_token_id, self.replacements,
                                                          batch_generator(batch["input_ids"]))
        return batch


def batch_generator(input_ids: Any) -> Any:
    """A generator seeded by a batch's token ids (its sequences and their order): see the module docstring."""
    import hashlib

    import torch

    digest = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def position_buckets(positions: np.ndarray, nll: np.ndarray, correct: np.ndarray, width: int) -> list[dict[str, Any]]:
    """Loss, perplexity and accuracy of the masked tokens by position in the sequence, `width` positions a row."""
    rows = []
    for start in range(0, int(positions.max(initial=0)) + 1, width):
        inside = (positions >= start) & (positions < start + width)
        if inside.any():
            loss = float(nll[inside].mean())
            rows.append({"positions": f"{start}-{start + width - 1}", "masked_tokens": int(inside.sum()), "loss": loss,
                         "perplexity": math.exp(loss), "accuracy": float(correct[inside].mean())})
    return rows


class MaskedPositions:
    """A forward pre-hook on a masked-LM head: while `positions` (a boolean batch x length mask) is set, the head
    sees only those positions' hidden states, so it returns (masked tokens x vocabulary) logits.

    Written here because the transformers MLM heads project every position onto the vocabulary, and only the
    masked ~15% have a loss. For a small encoder that projection is most of the step: MiniLM's decoder
    (384 x 30,522) has as many multiply-adds per token as its six layers together, and its logits (batch x length
    x 30,522 floats, and their gradient) are most of the memory. The model is still called as a whole, so
    DistributedDataParallel and autocast see an ordinary forward. The head is the family's (`Family.mlm_head`: BERT's
    `cls`, DistilBERT's `vocab_transform`, RoBERTa's `lm_head`, ModernBERT's `head`, ...); every module after it works
    position by position.
    """

    def __init__(self) -> None:
        self.positions: Any = None

    def __call__(self, module: Any, args: tuple) -> tuple | None:
        if self.positions is None:
            return None
        return (args[0][self.positions], *args[1:])

    @classmethod
    def on(cls, model: Any) -> "MaskedPositions | None":
        """The hook of `model` (installed on first use; under DistributedDataParallel on the model it wraps), or None
        for a family whose masked-LM head is not known (`Family.mlm_head`)."""
        from accelerate.utils import extract_model_from_parallel

        inner = extract_model_from_parallel(model)
        hook = inner.__dict__.get("_finetune_masked_positions")
        if hook is None:
            head = family_of(inner.config).mlm_head_module(inner)
            hook = False
            if head is not None:
                hook = cls()
                head.register_forward_pre_hook(hook)
            inner.__dict__["_finetune_masked_positions"] = hook
        return hook or None


class MaskedLMTask(Task):
    name = "masked_lm"
    description = ("masked-language-model pretraining on unlabelled text (whole words, 80/10/10, dynamic masks); "
                   "makes a checkpoint to fine-tune")
    metrics = M.named("perplexity", greater_is_better=False) | M.named("masked_accuracy")
    default_metric = "perplexity"
    has_label_names = False
    auto_model = "AutoModelForMaskedLM"
    keep_raw_columns = frozenset()  # the targets are the text itself, made by the collator
    eval_only_columns = ()
    per_token = True
    reads_text_pair = False
    serves = False
    feature_settings = ("mlm_probability", "whole_word_mask", "pack_sequences")

    # --- recipe ------------------------------------------------------------------------------
    def check_recipe(self, recipe: Any) -> list[str]:
        problems = super().check_recipe(recipe)
        if recipe.tracking.register_as:
            problems.append("tracking.register_as: a masked_lm run makes a checkpoint to fine-tune, not a model to "
                            "serve, so it is not registered; remove it")
        return problems

    def not_served(self, where: str) -> str:
        return (f"{where} is a masked_lm checkpoint (continued pretraining): it fills in masked words, it does not "
                f"answer requests. Fine-tune it: set model.checkpoint: {where} in a recipe of another task "
                "(finetune fields lists them)")

    # --- data --------------------------------------------------------------------------------
    def columns(self, data: Any) -> dict[str, str]:
        return {"data.text_column": data.text_column}

    def encode_labels(self, values, label_names, by_position, data):
        return None  # never called: masked_lm reads no label column

    @staticmethod
    def _texts(batch: dict[str, list], data: Any) -> list[str]:
        return [nfc(str(t)) for t in batch[data.text_column] if t is not None and str(t).strip()]

    def features(self, batch: dict[str, list], indices: list[int], ctx: FeatureContext) -> dict:
        import torch

        tokenizer, settings = ctx.tokenizer, ctx.settings
        try:
            sequences = split_into_sequences(tokenizer, self._texts(batch, ctx.data), ctx.max_length,
                                             settings.pack_sequences, settings.whole_word_mask)
        except ValueError as e:
            from finetune.errors import RecipeError

            raise RecipeError(str(e)) from None
        ids = [s[0] for s in sequences]
        words = [s[1] for s in sequences]
        out: dict[str, list] = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        if "token_type_ids" in tokenizer.model_input_names:
            out["token_type_ids"] = [[0] * len(x) for x in ids]
        out["word_ids"] = words
        if not ctx.train:
            # Masked here, once, with a seed fixed by the data's position: the same tokens at every evaluation.
            generator = torch.Generator().manual_seed(EVAL_MASK_SEED + (indices[0] if indices else 0))
            replacements = replacement_ids(tokenizer)
            masked, labels = [], []
            for row_ids, row_words in zip(ids, words):
                m, lab = mask_tokens(torch.tensor([row_ids]), torch.tensor([row_words]), settings.mlm_probability,
                                     tokenizer.mask_token_id, replacements, generator)
                masked.append(m[0].tolist())
                labels.append(lab[0].tolist())
            out["input_ids"], out["labels"] = masked, labels
        return out

    def token_lengths(self, batch: dict[str, list], data: Any, tokenizer: Any, settings: TaskSettings) -> list[int]:
        return [len(ids) for ids in tokenizer(self._texts(batch, data), truncation=False, verbose=False)["input_ids"]]

    def window_stats(self, rows: dict[str, list], lengths: np.ndarray, data: Any, tokenizer: Any, max_length: int,
                     settings: TaskSettings) -> dict[str, Any] | None:
        # Nothing is truncated: a text longer than a sequence continues in the next one.
        room = max(1, max_length - sum(map(len, special_template(tokenizer))))
        spans = np.maximum(1, -(-(lengths - (max_length - room)) // room))
        return {"multi_window_share": float((spans > 1).mean()), "windows_max": int(spans.max(initial=1)),
                "unit": "texts"}

    def label_counts(self, split: Any, label_names: Sequence[str] | None) -> dict[str, Any]:
        if "input_ids" in split.column_names:
            from finetune.data.batching import example_lengths

            return {"sequences": len(split), "tokens": int(sum(example_lengths(split)))}
        return {"texts": len(split)}

    def collator(self, tokenizer: Any, pad_to_multiple_of: int | None, settings: TaskSettings | None = None) -> Any:
        return MaskingCollator(tokenizer, pad_to_multiple_of, TaskSettings.of(settings).mlm_probability)

    # --- model and loss ----------------------------------------------------------------------
    def num_labels(self, label_names: Sequence[str] | None) -> int | None:
        return None

    def model_loaded(self, model: Any, loading_info: dict[str, Any], checkpoint: str, path: Path) -> None:
        new = sorted(loading_info.get("missing_keys") or [])
        if new:
            inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
            if outputs.weight is not inputs.weight:  # a config that unties them would leave a random projection
                outputs.weight = inputs.weight
            print(f"model.checkpoint {checkpoint} has no masked-language-model head: a new one was initialised "
                  f"({len(new)} weights: {', '.join(new[:4])}{', ...' if len(new) > 4 else ''}), its output "
                  "projection tied to the word embeddings")
        carry_pooler(model, path)

    def forward(self, model: Any, inputs: dict[str, Any], targets: dict[str, Any]) -> Any:
        """Outputs whose logits are (masked tokens x vocabulary), in the order of `labels != IGNORE_INDEX`, when
        the architecture's head is known (`MaskedPositions`); otherwise every position's."""
        hook = MaskedPositions.on(model)
        if hook is None or "labels" not in targets:
            return model(**inputs)
        hook.positions = targets["labels"] != IGNORE_INDEX
        try:
            return model(**inputs)
        finally:
            hook.positions = None

    def loss(self, outputs: Any, targets: dict[str, Any], settings: TaskSettings) -> Any:
        import torch.nn.functional as F

        logits, labels = outputs.logits, targets["labels"]
        if logits.dim() == 2:  # masked positions only (forward)
            return F.cross_entropy(logits, labels[labels != IGNORE_INDEX])
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX)

    # --- evaluation --------------------------------------------------------------------------
    def eval_tensors(self, outputs: Any, batch: dict) -> dict:
        import torch
        import torch.nn.functional as F

        logits, labels = outputs.logits, batch["labels"]
        if logits.dim() == 2:  # masked positions only: put them back in place (the rest are never read)
            masked = labels != IGNORE_INDEX
            nll = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
            nll[masked] = F.cross_entropy(logits.float(), labels[masked], reduction="none")
            predicted = torch.full_like(labels, IGNORE_INDEX)
            predicted[masked] = logits.argmax(dim=-1)
            return {"nll": nll, "predicted": predicted, "labels": labels}
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        return {"nll": nll, "predicted": logits.argmax(dim=-1), "labels": labels}

    def evaluation(self, collected: dict[str, list[np.ndarray]], reference: Reference, settings: TaskSettings,
                   label_names: Sequence[str] | None) -> tuple[dict[str, float], Any]:
        nll, correct, positions = [], [], []
        for losses, predicted, labels in zip(collected["nll"], collected["predicted"], collected["labels"]):
            rows, cols = np.nonzero(labels != IGNORE_INDEX)
            nll.append(losses[rows, cols])
            correct.append(predicted[rows, cols] == labels[rows, cols])
            positions.append(cols)
        nll, correct, positions = np.concatenate(nll), np.concatenate(correct), np.concatenate(positions)
        loss = float(nll.mean()) if len(nll) else float("nan")
        metrics = {"perplexity": math.exp(loss) if math.isfinite(loss) else float("nan"),
                   "masked_accuracy": float(correct.mean()) if len(correct) else 0.0}
        width = 64 if int(positions.max(initial=0)) >= 512 else 32
        summary = {"masked_tokens": int(len(nll)), "sequences": len(reference.features), "loss": loss, **metrics,
                   "by_position": position_buckets(positions, nll, correct, width)}
        return metrics, summary

    def write_artifacts(self, out_dir: Path, reference: Reference, outputs: Any, metrics: dict[str, float],
                        label_names: Sequence[str] | None, settings: TaskSettings) -> list[Path]:
        """summary.json (masked tokens, loss, perplexity, accuracy) and loss_by_position.csv, which shows whether
        positions a converted long-context model never saw in pretraining (past 512) have been learned."""
        import pandas as pd

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = out_dir / "summary.json"
        summary.write_text(json.dumps({k: v for k, v in outputs.items() if k != "by_position"}, indent=2))
        table = out_dir / "loss_by_position.csv"
        pd.DataFrame(outputs["by_position"]).to_csv(table, index=False)
        return [summary, table]

    # --- inputs and answers: refused (a checkpoint to fine-tune, not a model to serve) -------
    def parse_inputs(self, inputs: Sequence[Any], text_pair: bool) -> list[Any]:
        raise InputError(0, self.not_served("this model"))

    def encode(self, tokenizer: Any, inputs: list[Any], text_pair: bool, max_length: int,
               settings: TaskSettings) -> Encoded:
        raise InputError(0, self.not_served("this model"))

    def answer(self, inputs, encoded, rows, label_names, settings, options) -> list[dict[str, Any]]:
        raise InputError(0, self.not_served("this model"))


def carry_pooler(model: Any, path: Path) -> None:
    """Keep a checkpoint's trained pooler in the masked-LM model, frozen, so the folder it saves has it.

    BERT's and RoBERTa's masked-LM models have no pooler, but the heads fine-tuning puts on the saved folder read
    one (`Family.head_pooler`): without this, continued pretraining would hand fine-tuning a randomly initialised
    pooler, and a with/without comparison would measure that rather than the pretraining. Frozen, because the MLM
    loss never reaches it (and several processes would otherwise wait for its gradients).
    """
    family = family_of(model.config)
    encoder = family.encoder(model)
    if family.head_pooler is None or getattr(encoder, family.head_pooler, None) is not None:
        return
    from safetensors import safe_open

    found: dict[str, Any] = {}
    prefixes = [f"{family.head_pooler}.", f"{model.base_model_prefix}.{family.head_pooler}."]
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                for prefix in prefixes:
                    if key.startswith(prefix):
                        found[key.removeprefix(prefix)] = f.get_tensor(key)
    pooler = family.new_pooler(model.config)
    if set(found) != set(pooler.state_dict()):
        return
    pooler.load_state_dict(found)
    pooler.requires_grad_(False)
    setattr(encoder, family.head_pooler, pooler)
    print("kept the checkpoint's pooler (frozen) so fine-tuning the result starts from it")


MASKED_LM = MaskedLMTask()
