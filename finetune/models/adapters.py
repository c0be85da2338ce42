"""LoRA adapters with the peft library (`model.adapter`): adding one, saving and loading the adapter model, merging it,
and several adapter models on one base answering in one forward pass per batch (`SharedAdapters`).

An adapter model folder holds peft's `adapter_config.json` and `adapter_model.safetensors` (the low-rank updates
and the task head, which peft saves as `modules_to_save`), the task model's `config.json` (labels, head size),
the tokenizer and `finetune.json`, whose `adapter` entry names the base checkpoint and a digest of its weights. So
it is a few MB, and loading it means loading the base, putting a head of the saved shape on it and the adapter on
top; a base that cannot be found, or whose weights are not the ones the adapter was trained on, is refused, naming
what is missing. `finetune export` merges the adapter into the base first (`merged`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from finetune.errors import CheckpointError, RecipeError
from finetune.families import family_of
from finetune.families.pooling import CONFIG_KEY as POOLING_KEY
from finetune.families.pooling import install_pooling
from finetune.families.support import default_lora_targets, linear_names
from finetune.models.pretrained import check_weights_format, resolve_checkpoint

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
log = logging.getLogger(__name__)

# The recipe's bounds (finetune.config.recipe.AdapterSection): a saved adapter may not go beyond what a run writes.
MAX_RANK = 1024
MAX_ALPHA = 4096
# adapter_config.json fields finetune sets (checked one by one below) and peft's bookkeeping; every other LoraConfig
# field must keep peft's default, since finetune never changes it (layer_replication, use_dora, rank_pattern...).
_SET_BY_FINETUNE = {"r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias", "peft_type"}
_BOOKKEEPING = {"peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"}


def is_adapter_model(model: Any) -> bool:
    return hasattr(model, "peft_config")


def is_adapter_folder(path: Path | str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def head_modules(model: torch.nn.Module) -> list[str]:
    """The task head: the model's top-level modules with weights, other than the encoder (BERT: classifier, and the
    pooler inside the encoder that the head reads, `Family.head_pooler`; DistilBERT: pre_classifier and classifier;
    ModernBERT: head and classifier; QA: qa_outputs). peft matches the names as suffixes of module paths."""
    from finetune.models.layers import head_pooler

    pooler = family_of(model.config).head_pooler
    return [name for name, child in model.named_children()
            if name != model.base_model_prefix and any(True for _ in child.parameters())] + \
        ([pooler] if head_pooler(model) is not None else [])


def target_modules(model: torch.nn.Module, asked: list[str] | None) -> list[str]:
    """The layers to adapt: the recipe's, else the family's default (`Family.lora_targets`: the attention query and
    value projections, ModernBERT's fused projection).

    Raises RecipeError naming the ones the model has when it lacks any of them.
    """
    family = family_of(model.config)
    encoder = family.encoder(model)
    have = linear_names(encoder)
    if asked is None:
        default, problem = default_lora_targets(family, encoder)
        if default is None:
            raise RecipeError(f"model.adapter.target_modules: {problem}")
        return default
    missing = [t for t in asked if t not in have]
    if missing:
        raise RecipeError(f"model.adapter.target_modules: the model has no linear layer named {', '.join(missing)}; "
                          f"its encoder's linear layers are: {', '.join(have)}")
    return list(asked)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the encoder's weights (names and bytes), to tell later that a base is the one an adapter was trained on."""
    encoder = getattr(model, model.base_model_prefix)
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(re.sub(r"\.base_layer\.", ".", name).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def add_adapter(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """Wrap a task model with a fresh LoRA adapter (`cfg`: the recipe's AdapterSection); only the adapter and the
    head train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=target_modules(model, cfg.target_modules), modules_to_save=head_modules(model),
                        bias="none")
    return get_peft_model(model, config)


def adapter_settings(model: torch.nn.Module, cfg: Any, base: dict[str, Any]) -> dict[str, Any]:
    """finetune.json's `adapter` entry: the adapter's settings and the base it applies to."""
    peft_config = model.peft_config["default"]
    return {"type": cfg.type, "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "target_modules": sorted(peft_config.target_modules), "head": list(peft_config.modules_to_save or []),
            "base": base}


def base_reference(checkpoint: str, revision: str | None, resolved_path: Path, source: str, digest: str) -> dict[str, Any]:
    """How an adapter names its base: the hub id as the recipe gave it (found again through the mirror, packages or
    hub), or the absolute folder, plus the digest of the weights it was trained on."""
    return {"checkpoint": str(resolved_path) if source == "local" else checkpoint, "revision": revision,
            "digest": digest}


def resolve_base(adapter: dict[str, Any]) -> Path:
    """The base checkpoint's folder on this machine, or a CheckpointError saying what is missing."""
    base = adapter.get("base") or {}
    name = base.get("checkpoint")
    if not name:
        raise CheckpointError("this adapter model does not name its base checkpoint (finetune.json adapter.base.checkpoint)")
    try:
        return resolve_checkpoint(name, base.get("revision")).path
    except CheckpointError as e:
        raise CheckpointError(f"this adapter model applies to the base checkpoint {name!r}, which cannot be loaded here: {e}"
                              ) from None


def _value(value: Any) -> str:
    """A value as JSON shows it, cut short (it comes from a file anyone may have edited)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _adapter_problem(config: Any, adapter: dict[str, Any], task: Any) -> str | None:
    """What is wrong with an adapter_config.json's values (the first problem), or None."""
    from peft import LoraConfig

    if not isinstance(config, dict):
        return "a JSON object is expected"
    if config.get("peft_type") != "LORA":
        return f"peft_type {_value(config.get('peft_type'))}: finetune makes and loads LORA adapters only"
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        return f"r {_value(r)}: a whole number from 1 to {MAX_RANK} (model.adapter.r)"
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= MAX_ALPHA:
        return f"lora_alpha {_value(alpha)}: a number above 0, at most {MAX_ALPHA} (model.adapter.alpha)"
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        return f"lora_dropout {_value(dropout)}: from 0 to below 1"
    for key in ("target_modules", "modules_to_save"):
        names = config.get(key)
        # A text would be a regular expression peft matches against every module: only plain names are written.
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.isidentifier() for n in names):
            return f"{key} must be a list of module names"
    if config.get("bias", "none") != "none":
        return f"bias {_value(config.get('bias'))}: finetune's adapters train no biases (none)"
    defaults = LoraConfig().to_dict()
    for key, value in sorted(config.items()):
        if key in _SET_BY_FINETUNE or key in _BOOKKEEPING:
            continue
        default = defaults.get(key)
        same = value == default or (value in (None, False, {}, []) and default in (None, False, {}, []))
        if not same:
            known = "" if key in defaults else " (a field this peft does not know)"
            return (f"{key} is {_value(value)}{known}; finetune never sets it, so it must be "
                    f"{default!r}: the folder was edited or made by another tool")
    mapping = config.get("auto_mapping")
    if mapping is not None:
        head = task.auto_model.removeprefix("AutoModel")
        base_class = mapping.get("base_model_class") if isinstance(mapping, dict) else None
        if not isinstance(base_class, str) or not base_class.endswith(head):
            return (f"auto_mapping.base_model_class {_value(base_class)} is not a {head[3:]} model, which "
                    f"task {task.name} needs")
    saved = {"r": r, "alpha": alpha, "target_modules": sorted(config["target_modules"]),
             "head": list(config["modules_to_save"])}
    for key, value in saved.items():
        if key in adapter and (sorted(adapter[key]) if key == "target_modules" else adapter[key]) != value:
            return f"{key} {_value(value)} disagrees with finetune.json's adapter.{key} {_value(adapter[key])}"
    return None


def check_adapter_config(path: Path | str, adapter: dict[str, Any], task: Any) -> dict[str, Any]:
    """The adapter_config.json of an adapter model folder, once it is within what finetune writes: a LoRA adapter,
    rank and alpha within the recipe's bounds, no field finetune never sets (layer_replication, DoRA, patterns...),
    module lists of plain names, agreeing with finetune.json. Raises CheckpointError naming the file and the field,
    before peft builds anything (a rank of 20000 would allocate gigabytes first)."""
    from finetune.files import read_json

    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file() or file.is_symlink():
        raise CheckpointError(f"{file} is missing (an adapter model's settings); the model folder is damaged or "
                              "incomplete: save, export or download it again")
    try:
        config = read_json(file)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is unreadable ({e})") from None
    problem = _adapter_problem(config, adapter, task)
    if problem:
        raise CheckpointError(f"{file}: {problem}")
    return config


def check_adapter_fits(path: Path, config: dict[str, Any], model: torch.nn.Module) -> None:
    """Before peft loads the adapter on `model` (the base with its task head): every target module is a linear
    layer the base has, modules_to_save covers the task head, and the saved weights are there with the shapes the
    rank says. Raises CheckpointError naming what is missing or wrong."""
    from safetensors import safe_open

    file = path / ADAPTER_CONFIG
    have = linear_names(family_of(model.config).encoder(model))
    missing = [t for t in config["target_modules"] if t not in have]
    if missing:
        raise CheckpointError(f"{file}: target_modules names {', '.join(missing)}, which the base model does not "
                              f"have (its linear layers: {', '.join(have)})")
    head = head_modules(model)
    uncovered = [h for h in head if h not in config["modules_to_save"]]
    extra = [m for m in config["modules_to_save"] if m not in head]
    if uncovered or extra:
        raise CheckpointError(f"{file}: modules_to_save is {config['modules_to_save']}; the task head of this model "
                              f"is {head}")
    weights = path / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # SafetensorError derives from Exception only
        raise CheckpointError(f"{weights}: not readable safetensors ({str(e)[:160]})") from None
    r = config["r"]
    for key, shape in shapes.items():
        if ".lora_A." in key and (len(shape) != 2 or shape[0] != r) or \
                ".lora_B." in key and (len(shape) != 2 or shape[1] != r):
            raise CheckpointError(f"{weights}: {key} has shape {list(shape)}, not rank {r} as {ADAPTER_CONFIG} says")
    for name in head:
        if not any(f".{name}." in f".{key}" and "lora_" not in key for key in shapes):
            raise CheckpointError(f"{weights} has no weights for the task head {name!r}; the model folder is damaged "
                                  "or incomplete: save, export or download it again")
    for name in config["target_modules"]:
        if not any(f".{name}.lora_A." in key for key in shapes):
            raise CheckpointError(f"{weights} has no LoRA weights for {name!r}, which {ADAPTER_CONFIG} adapts")


def load_adapter_model(path: Path | str, task: Any, adapter: dict[str, Any], base_path: Path | str | None = None):
    """The adapter model of a saved folder: the base (found from finetune.json unless `base_path` is given) with a
    head of the saved shape, the adapter and head weights loaded on top; in eval mode, not merged."""
    from peft import PeftModel
    from transformers import AutoConfig

    from finetune.models.modeling import model_class, new_weights

    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path} is an adapter model without {ADAPTER_WEIGHTS} (safetensors only)")
    config = check_adapter_config(path, adapter, task)
    base_path = Path(base_path) if base_path is not None else resolve_base(adapter)
    check_weights_format(base_path, allow_pickle=False)
    head_config = AutoConfig.from_pretrained(path)
    extra = {k: getattr(head_config, k) for k in ("id2label", "label2id", "num_labels", "problem_type")
             if getattr(head_config, k, None) is not None}
    # What the head reads is in the task model's config (model.pooling): the base gets it too.
    own = family_of(head_config).pooling_key
    for key in ("attention_type", "block_size", "num_random_blocks") + ((own,) if own else ()):
        if getattr(head_config, key, None) is not None:
            extra[key] = getattr(head_config, key)
    with _without_load_report():
        model, loading = model_class(task).from_pretrained(base_path, use_safetensors=True, output_loading_info=True,
                                                           **extra)
    missing = _not_in_adapter(model, new_weights(model, loading).encoder)
    if missing:
        raise CheckpointError(
            f"the base checkpoint at {base_path} lacks {len(missing)} encoder weights this adapter needs "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): is it the checkpoint the adapter was "
            "trained on?")
    if getattr(head_config, POOLING_KEY, None) is not None:
        setattr(model.config, POOLING_KEY, getattr(head_config, POOLING_KEY))
    install_pooling(model)
    want = (adapter.get("base") or {}).get("digest")
    if want and weights_digest(model) != want:
        raise CheckpointError(
            f"the base checkpoint {adapter['base'].get('checkpoint')!r} found at {base_path} is not the one this adapter "
            f"was trained on (weights digest {weights_digest(model)[:19]}..., expected {want[:19]}...); put the original "
            "checkpoint there")
    check_adapter_fits(path, config, model)
    return PeftModel.from_pretrained(model, str(path), is_trainable=False).eval()


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """Drop transformers' load report while the base of an adapter model loads: it says the head is MISSING and
    "newly initialized ... Consider training", which is expected there (the adapter folder's head weights are loaded
    right after) and alarming on the terminal of predict, serve and export. What is really missing is checked from
    the loading info instead (`_not_in_adapter`)."""
    report = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    report.addFilter(drop)
    try:
        yield
    finally:
        report.removeFilter(drop)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _not_in_adapter(model: torch.nn.Module, missing: list[str]) -> list[str]:
    """Missing encoder weights that the adapter folder does not bring either (its head, and the pooler the head
    reads, come from the adapter's weights)."""
    heads = head_modules(model)
    return [key for key in missing if not any(f".{name}." in f".{key}" for name in heads)]


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain task model with the adapter folded into the base weights (and the trained head), for export."""
    import copy

    return copy.deepcopy(model).merge_and_unload().eval()


def merge_for_serving(predictor: Any) -> bool:
    """Fold a served adapter model's adapter into its base weights, in place (peft's `merge_adapter`), so that it runs
    as a plain model does. Unmerged, every adapted layer adds LoRA's small products to each pass: served alone on 2
    cores, one adapter model answered 0.61x the requests of the plain model (bench/adapters.py, BENCHMARKS.md).

    Only for a model whose base weights nothing else holds: the merge writes them, and `share_base` points other
    adapter models at the same tensors. The model's example input must answer as before (within 1e-4, bf16 5e-2);
    otherwise the adapter is taken out again (peft's `unmerge_adapter`: the base weights as they were, to float
    rounding) and the model stays unmerged. Returns whether it merged."""
    model = predictor.model
    if not is_adapter_model(model) or set(model.peft_config) != {"default"}:
        return False
    example = predictor.example_features()
    before = predictor.outputs(example)
    try:
        model.merge_adapter()
        if _outputs_agree(predictor.outputs(example), before, predictor.precision):
            return True
        log.warning("merging the adapter into its base changed the model's outputs; it answers unmerged")
    except Exception as e:  # a LoRA variant peft cannot merge: it answers unmerged, as before
        log.info("the adapter stays unmerged (%s: %s)", type(e).__name__, e)
    model.unmerge_adapter()  # whatever layers were merged
    return False


def _outputs_agree(got: list[np.ndarray], want: list[np.ndarray], precision: str) -> bool:
    """The same model's outputs computed two ways (merged, in a mixed batch) agree: 1e-4 in fp32, 5e-2 in bf16 or
    fp16 (a batch's padding moves low-precision sums a little)."""
    tolerance = 1e-4 if precision == "fp32" else 5e-2
    return all(np.allclose(a, b, rtol=tolerance, atol=tolerance) for a, b in zip(got, want))


def share_base(models: list[torch.nn.Module]) -> int:
    """Make adapter models on the same base hold one copy of its weights: the later models' base parameters become
    the first's (the adapters add to the base's outputs and never change its weights). Returns the parameters shared."""
    if len(models) < 2:
        return 0
    first = {_plain_name(n): p for n, p in models[0].named_parameters() if "lora_" not in n and _in_base(models[0], n)}
    shared = 0
    for other in models[1:]:
        for module_name, module in other.named_modules():
            for name, param in list(module._parameters.items()):
                full = f"{module_name}.{name}" if module_name else name
                if param is None or "lora_" in full or not _in_base(other, full):
                    continue
                mine = first.get(_plain_name(full))
                if mine is not None and mine is not param and mine.shape == param.shape and torch.equal(mine, param):
                    module._parameters[name] = mine
                    shared += 1
    return shared


def _plain_name(name: str) -> str:
    return re.sub(r"\.base_layer\.", ".", name)


def _in_base(model: Any, name: str) -> bool:
    return f".{model.base_model_prefix}." in f".{name}"


# --- several adapters in one forward pass ---------------------------------------------------------------------------


def shared_pass_key(predictor: Any) -> str | None:
    """What adapter models must have in common to answer in one forward pass (`SharedAdapters`), as one string, or
    None for a model that runs alone: not a LoRA adapter model on PyTorch (an ONNX export is merged), no base digest
    to tell its base by, or a BigBird (its batches switch attention type by length, `finetune.models.bigbird`).

    The same base weights (digest), task and head shape (the config, labels aside: a head's shape is its label
    count), what pads a batch (max_length, pad_to_multiple_of, text pairs, the tokenizer's pad token and side) and
    where and how it runs (device, precision)."""
    from finetune.models.bigbird import is_bigbird

    model, info = getattr(predictor, "model", None), predictor.info
    digest = ((info.adapter or {}).get("base") or {}).get("digest")
    if not digest or not is_adapter_model(model) or is_bigbird(model) or set(model.peft_config) != {"default"}:
        return None
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("id2label", "label2id", "_name_or_path", "transformers_version")}
    tokenizer = predictor.tokenizer
    return json.dumps({"digest": digest, "task": info.task, "labels": model.config.num_labels, "config": config,
                       "max_length": info.max_length, "pad_to_multiple_of": info.pad_to_multiple_of,
                       "text_pair": info.text_pair, "pad": [tokenizer.pad_token_id, tokenizer.padding_side],
                       "device": str(predictor.device), "precision": predictor.precision}, sort_keys=True, default=str)


class SharedAdapters:
    """Adapter models on one base (one `shared_pass_key`) answering in shared forward passes.

    Their adapters live in ONE PeftModel, the first model's, each under a name of its own (`adapter_of`); the
    weights are the very tensors each model loaded (through `load_adapter_model`'s checks), not copies, so each
    model's own Predictor still answers alone exactly as before. A batch mixing their inputs runs once, each row
    with its model's adapter (`finetune.models.adapter_rows.rows_of_adapters`).
    """

    def __init__(self, predictors: dict[str, Any]):
        """predictors: the models by the names they are served as, in order, all of one `shared_pass_key`; the first
        one's model becomes the shared one.

        Raises ValueError, leaving the first model as it was, when an adapter's weights do not map onto the shared
        model one to one, or when a mixed batch does not give each model's own outputs (`_check`): DeBERTa-v2, say,
        runs its relative positions through the adapted projections once for the whole batch, which no row can
        have an adapter of its own in."""
        names = list(predictors)
        self.lead = predictors[names[0]]
        self.model = self.lead.model
        self.adapter_of = {names[0]: "default"}
        try:
            for i, name in enumerate(names[1:], 1):
                adapter = f"shared{i}"  # not the served name: peft's module dicts refuse names with dots
                config = copy.deepcopy(predictors[name].model.peft_config["default"])
                config.inference_mode = True
                self.adapter_of[name] = adapter
                self.model.add_adapter(adapter, config)
                _share_adapter_weights(self.model, adapter, predictors[name].model)
            self.model.set_adapter("default")  # what the first model's own Predictor answers with
            self.model.eval()
            self._check(predictors)
        except Exception:
            for adapter in list(self.adapter_of.values())[1:]:
                if adapter in self.model.peft_config:
                    self.model.delete_adapter(adapter)
            self.model.set_adapter("default")
            raise

    @property
    def base(self) -> str:
        """The base checkpoint, as the adapters' finetune.json names it."""
        return str(((self.lead.info.adapter or {}).get("base") or {}).get("checkpoint", "?"))

    @property
    def names(self) -> list[str]:
        """The served names of the models that share the passes, in order."""
        return list(self.adapter_of)

    def outputs(self, features: list[dict[str, Any]], names: list[str]) -> list[Any]:
        """The outputs of features of several models, `names[i]` being the model feature i is for
        (`Predictor.outputs`, one pass per batch)."""
        return self.lead.outputs(features, adapter_names=[self.adapter_of[n] for n in names])

    def _check(self, predictors: dict[str, Any]) -> None:
        """Every model's example input twice, interleaved with the others' in one batch, against the model alone."""
        examples = {n: p.example_features() for n, p in predictors.items()}
        features, names = [], []
        for _ in range(2):
            for name, own in examples.items():
                features += own
                names += [name] * len(own)
        mixed = self.outputs(features, names)
        for name, predictor in predictors.items():
            alone = predictor.outputs(examples[name]) * 2
            got = [row for row, n in zip(mixed, names) if n == name]
            if not _outputs_agree(got, alone, self.lead.precision):
                raise ValueError(f"{name}: in a batch mixed with the others its outputs are not its own")

    def adapter_bytes(self) -> int:
        """Memory the extra adapters add to the shared model: their LoRA and head weights."""
        extra = set(self.adapter_of.values()) - {"default"}
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters(remove_duplicate=False)
                   if any(f".{a}." in f".{n}." for a in extra))


def _share_adapter_weights(shared: torch.nn.Module, adapter: str, own: torch.nn.Module) -> None:
    """Point the shared model's fresh `adapter` (LoRA layers and head copies) at the weights of `own`, an adapter
    model holding one adapter, "default"; then check that the two adapters' state dicts are the same."""
    from peft.utils import get_peft_model_state_dict

    theirs = dict(own.named_parameters(remove_duplicate=False))
    theirs.update(own.named_buffers(remove_duplicate=False))
    mark = f".{adapter}."
    for module_name, module in shared.named_modules():
        for kind in (module._parameters, module._buffers):
            for name, tensor in list(kind.items()):
                full = f"{module_name}.{name}"
                if tensor is None or mark not in f".{full}.":
                    continue
                source = theirs.get(f".{full}".replace(mark, ".default.")[1:])
                if source is None or source.shape != tensor.shape:
                    raise ValueError(f"{full} has no counterpart of the same shape in the adapter model")
                kind[name] = source
    mine, want = get_peft_model_state_dict(shared, adapter_name=adapter), get_peft_model_state_dict(own)
    if mine.keys() != want.keys() or any(mine[k] is not want[k] and not torch.equal(mine[k], want[k]) for k in want):
        raise ValueError("the adapter's weights do not map one to one onto the shared model")
