"""`finetune convert --to bigbird`: warm-start a long-context BigBird from a BERT-family checkpoint.

BigBird and Longformer were not trained from scratch: they started from RoBERTa's weights with its
512 learned position embeddings copied over and over up to the new length. This does the same for
any BERT or DistilBERT checkpoint (the offline MiniLM included): a BigBirdConfig with the source's
sizes, every weight copied by an explicit name map (nothing may stay randomly initialised; the
conversion fails naming any weight that would), and the position embeddings tiled to `max_length`.

The result is checked before it is put in place: reloaded from disk with full attention, it must give
the source's hidden states on inputs the source can read (at most its 512 positions) to within
`tolerance`; the largest difference is reported.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ConversionError
from finetune.families import family_of
from finetune.families.big_bird import default_sparse_min_length, min_sparse_length
from finetune.models.conversion_folder import checked_source, publish, staging_folder

MAX_LENGTH_LIMIT = 16384  # model.max_length's upper bound in recipes


def _sources() -> list[str]:
    """The families whose layers `convert --to bigbird` can map onto BigBird's (`Family.bert_layout`)."""
    from finetune.families import FAMILIES

    return [name for name, family in FAMILIES.items() if family.bert_layout is not None]


def bigbird_config(source_config: Any, tokenizer: Any, max_length: int, attention_type: str, block_size: int,
                   num_random_blocks: int):
    """A BigBirdConfig with the source's sizes, `max_length` positions and the given attention settings."""
    from transformers import BigBirdConfig

    def token_id(name: str, fallback: int | None) -> int | None:
        value = getattr(tokenizer, name, None)
        return value if value is not None else fallback

    pad = token_id("pad_token_id", getattr(source_config, "pad_token_id", None) or 0)
    sep = token_id("sep_token_id", None)
    return BigBirdConfig(
        vocab_size=source_config.vocab_size, max_position_embeddings=max_length,
        initializer_range=source_config.initializer_range, attention_type=attention_type, block_size=block_size,
        num_random_blocks=num_random_blocks, use_bias=True, rescale_embeddings=False,
        # BigBirdConfig's defaults (bos 1, eos 2, sep 66) are the ids of BigBird's own vocabulary, not this one's.
        pad_token_id=pad, bos_token_id=token_id("cls_token_id", None), eos_token_id=sep, sep_token_id=sep,
        architectures=["BigBirdModel"], **family_of(source_config).bert_sizes(source_config),
    )


def weight_map(source_config: Any, num_layers: int, pooler: bool, token_types: bool) -> dict[str, str]:
    """BigBird weight name -> source weight name, for everything copied as it is (the family's `bert_layout`).

    The position embeddings (tiled) and the token-type embeddings of a source without them (zeros) are not in it.
    """
    layout = family_of(source_config).bert_layout
    mapping: dict[str, str] = {}
    for name in ("word_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        mapping[f"embeddings.{name}"] = f"embeddings.{name}"
    if token_types:
        mapping["embeddings.token_type_embeddings.weight"] = "embeddings.token_type_embeddings.weight"
    for layer in range(num_layers):
        for target, source in layout.items():
            for param in ("weight", "bias"):
                mapping[f"encoder.layer.{layer}.{target}.{param}"] = f"{source.format(layer)}.{param}"
    if pooler:
        # BertPooler is dense + tanh; BigBird's pooler is the same Linear, one level up.
        mapping["pooler.weight"] = "pooler.dense.weight"
        mapping["pooler.bias"] = "pooler.dense.bias"
    return mapping


def tile_positions(weight: torch.Tensor, length: int) -> torch.Tensor:
    """The learned position embeddings repeated end to end up to `length` (positions below the source's
    length keep their exact vectors, so short inputs are encoded as before)."""
    copies = math.ceil(length / weight.shape[0])
    return weight.repeat(copies, 1)[:length].clone()


def _check_arguments(max_length: int, attention_type: str, block_size: int, num_random_blocks: int) -> None:
    if attention_type not in ("block_sparse", "original_full"):
        raise ConversionError(f"--attention-type: {attention_type!r}; allowed: block_sparse, original_full")
    if block_size < 1:
        raise ConversionError(f"--block-size: {block_size}; allowed: 1 or more")
    if num_random_blocks < 0:
        raise ConversionError(f"--num-random-blocks: {num_random_blocks}; allowed: 0 or more")
    if not 1 <= max_length <= MAX_LENGTH_LIMIT:
        raise ConversionError(f"--max-length: {max_length}; allowed: 1 to {MAX_LENGTH_LIMIT} (model.max_length's limit)")
    if max_length % block_size:
        # Batches are padded to a multiple of the block size, so the longest must still have positions.
        raise ConversionError(
            f"--max-length: {max_length} is not a multiple of --block-size {block_size}; allowed: a multiple such as "
            f"{(max_length // block_size + 1) * block_size}"
        )
    shortest = min_sparse_length(block_size, num_random_blocks)
    if attention_type == "block_sparse" and max_length < shortest:
        raise ConversionError(
            f"--max-length: {max_length} is too short for block_sparse attention with block size {block_size} and "
            f"{num_random_blocks} random blocks; allowed: at least {shortest}, or --attention-type original_full"
        )


def _load_source(path: Path, allow_pickle: bool) -> tuple[Any, bool]:
    """The source encoder, and whether it has trained pooler weights."""
    from transformers import AutoModel

    # None lets transformers prefer safetensors and fall back to pickle; False would insist on pickle.
    model, info = AutoModel.from_pretrained(path, use_safetensors=None if allow_pickle else True,
                                            output_loading_info=True)
    missing = set(info["missing_keys"])
    pooler_missing = {k for k in missing if k.startswith("pooler.")}
    if missing - pooler_missing or info["mismatched_keys"]:
        raise ConversionError(
            f"the source checkpoint {path} does not hold all its own weights (missing: "
            f"{', '.join(sorted(missing - pooler_missing)[:8]) or '-'}; mismatched: {', '.join(sorted(map(str, info['mismatched_keys']))[:8]) or '-'}); "
            "its model would start partly random, so it cannot be converted"
        )
    has_pooler = getattr(model, "pooler", None) is not None and not pooler_missing
    return model.eval(), has_pooler


def _converted_state(source_state: dict[str, torch.Tensor], target_state: dict[str, torch.Tensor], source_config: Any,
                     num_layers: int, pooler: bool) -> dict[str, torch.Tensor]:
    """The BigBird state dict, every tensor taken from the source; fails naming anything left unset or unused."""
    token_types = "embeddings.token_type_embeddings.weight" in source_state
    mapping = weight_map(source_config, num_layers, pooler, token_types)
    new: dict[str, torch.Tensor] = {}
    for target, source in mapping.items():
        if source not in source_state:
            raise ConversionError(f"the source has no weight {source!r} (for BigBird's {target!r})")
        new[target] = source_state[source].clone()
    length = target_state["embeddings.position_embeddings.weight"].shape[0]
    new["embeddings.position_embeddings.weight"] = tile_positions(source_state["embeddings.position_embeddings.weight"], length)
    if not token_types:
        new["embeddings.token_type_embeddings.weight"] = torch.zeros_like(target_state["embeddings.token_type_embeddings.weight"])
    unset = sorted(set(target_state) - set(new))
    if unset:
        raise ConversionError(f"these BigBird weights would stay randomly initialised: {', '.join(unset)}")
    used = set(mapping.values()) | {"embeddings.position_embeddings.weight"}
    unused = sorted(set(source_state) - used)
    if unused:
        raise ConversionError(f"these source weights have no place in BigBird, so the result would differ: {', '.join(unused)}")
    wrong = [f"{k} {tuple(new[k].shape)} vs {tuple(target_state[k].shape)}" for k in new
             if new[k].shape != target_state[k].shape]
    if wrong:
        raise ConversionError(f"weights of the wrong shape: {'; '.join(wrong)}")
    return new


def _parity_inputs(vocab_size: int, length: int, type_vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two random inputs: one of the full length (with both segments) and one half as long, padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, length // 2 :] = 0
    token_type_ids = torch.zeros(2, length, dtype=torch.long)
    if type_vocab_size > 1:
        token_type_ids[:, length // 2 :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


@torch.inference_mode()
def parity(source: Any, converted: Any, length: int) -> float:
    """Largest absolute difference between the two models' hidden states (and pooler outputs) on real tokens."""
    import inspect

    inputs = _parity_inputs(converted.config.vocab_size, length, converted.config.type_vocab_size)
    accepted = inspect.signature(source.forward).parameters
    source_inputs = {k: v for k, v in inputs.items() if k in accepted}  # a source without token types ignores them
    a, b = source(**source_inputs), converted(**inputs)
    real = inputs["attention_mask"].bool()
    worst = (a.last_hidden_state[real] - b.last_hidden_state[real]).abs().max().item()
    if getattr(a, "pooler_output", None) is not None and getattr(b, "pooler_output", None) is not None:
        worst = max(worst, (a.pooler_output - b.pooler_output).abs().max().item())
    return worst


@torch.inference_mode()
def _sparse_smoke_test(model: Any) -> None:
    """One forward pass with block-sparse attention at the shortest length that uses it (it must run and be finite)."""
    from finetune.models.bigbird import attention_for_batch

    config = model.config
    length = min(default_sparse_min_length(config.block_size, config.num_random_blocks), config.max_position_embeddings)
    input_ids = torch.randint(5, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with attention_for_batch(model, input_ids) as chosen:
        hidden = model(input_ids=input_ids).last_hidden_state
    if chosen != "block_sparse" or not torch.isfinite(hidden).all():
        raise ConversionError(f"the converted model does not run block-sparse attention at {length} tokens ({chosen})")


def convert_to_bigbird(source: str, target: str | Path, max_length: int = 4096, attention_type: str = "block_sparse",
                       block_size: int = 64, num_random_blocks: int = 3, tolerance: float = 1e-4,
                       allow_pickle: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Convert a BERT or DistilBERT checkpoint into a BigBird checkpoint folder at `target`; returns the report.

    `source` resolves like a recipe's model.checkpoint (a folder, a mirrored or packaged hub id, or the hub).
    The folder is written beside `target` and moved into place only after the parity check passed.
    """
    from transformers import AutoModel, AutoTokenizer, BigBirdModel

    started = time.perf_counter()
    _check_arguments(max_length, attention_type, block_size, num_random_blocks)
    target, resolved, source_config = checked_source(source, target, overwrite, allow_pickle)
    source_type = source_config.model_type
    if family_of(source_config).name not in _sources():
        raise ConversionError(
            f"{source} is a {source_type} checkpoint; finetune convert --to bigbird supports {', '.join(_sources())} "
            "(BERT's weight layout with absolute learned positions counted from 0)"
        )
    if getattr(source_config, "position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{source} uses {source_config.position_embedding_type} position embeddings; "
                              "only absolute learned positions can be tiled")
    if getattr(source_config, "sinusoidal_pos_embds", False):
        raise ConversionError(f"{source} uses fixed sinusoidal positions; only learned positions can be tiled")

    source_model, has_pooler = _load_source(resolved.path, allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    config = bigbird_config(source_config, tokenizer, max_length, attention_type, block_size, num_random_blocks)
    converted = BigBirdModel(config, add_pooling_layer=has_pooler)
    state = _converted_state(source_model.state_dict(), converted.state_dict(), source_config,
                             config.num_hidden_layers, has_pooler)
    converted.load_state_dict(state, strict=True)

    with staging_folder(target) as tmp:
        converted.save_pretrained(tmp, safe_serialization=True)
        tokenizer.model_max_length = max_length
        tokenizer.save_pretrained(tmp)
        # Checked on the saved folder, not the object in memory: that is what recipes will load.
        reloaded, info = AutoModel.from_pretrained(tmp, use_safetensors=True, output_loading_info=True)
        # A source without a pooler gives none; BigBird's classification head does not use it anyway.
        missing = set(info["missing_keys"]) - (set() if has_pooler else {"pooler.weight", "pooler.bias"})
        if missing or info["mismatched_keys"]:
            raise ConversionError(f"the saved BigBird reloads with weights missing: {sorted(missing)} "
                                  f"{sorted(map(str, info['mismatched_keys']))}")
        reloaded.eval()
        reloaded.set_attention_type("original_full")
        length = min(source_config.max_position_embeddings, max_length)
        difference = parity(source_model, reloaded, length)
        if not difference <= tolerance:
            raise ConversionError(
                f"the converted model does not reproduce {source}: hidden states differ by up to {difference:.3g} "
                f"on inputs of {length} tokens with full attention (tolerance {tolerance:g})"
            )
        reloaded.set_attention_type(attention_type)
        if attention_type == "block_sparse":
            _sparse_smoke_test(reloaded)
        report = {
            "source": source, "source_path": str(resolved.path), "source_type": source_type, "target": str(target),
            "max_length": max_length, "source_positions": source_config.max_position_embeddings,
            "attention_type": attention_type, "block_size": block_size, "num_random_blocks": num_random_blocks,
            "pooler": has_pooler, "weights_copied": len(state),
            "parity_length": length, "parity_max_abs_diff": difference, "tolerance": tolerance,
        }
        return publish(tmp, target, report, started)
