"""What a model family is: the interface every family implements, with defaults that read the structure from the model.

A family is one encoder architecture as transformers builds it (BERT, RoBERTa, ModernBERT, ...). It says, in one
class: where the encoder's embeddings and layers are, what the task head reads (the first token, a pooled vector,
every position) and how `model.pooling` is applied, the positions an input may use, which attention dropout the
recipe can set, the default LoRA targets, the masked-LM head (for the masked-positions shortcut) and what of it a
fine-tuned head keeps, how layers are dropped (`convert --to fewer-layers`) and what else only it knows. Freezing,
layer-wise learning rates, adapters, pretraining, conversion, export and `finetune validate` ask the family; no
other module tests a model type or a module name. A new family is one module and one line in
`finetune.families.registry`.

Where the structure can be read from the model it is: the layer list is the `nn.ModuleList` inside the encoder that
holds `num_hidden_layers` modules, the embeddings are the encoder's child that holds the input embeddings. A family
only adds what cannot be read (ELECTRA's embedding projection, DeBERTa's relative position embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

POOLINGS = ("auto", "first", "mean")
"""`model.pooling`: the family's own choice (`auto`), the first token's final hidden state, or the mean over the
input's tokens (attention-masked)."""

POOLING_CONFIG_KEY = "finetune_pooling"
"""The config key that asks for `model.pooling: mean` where the family has no setting of its own
(`finetune.families.pooling`)."""

# The transformers Auto classes of the task heads, and the mapping of model types that have each.
HEAD_MAPPINGS = {
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "AutoModelForMultipleChoice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
}


@dataclass(frozen=True)
class Layers:
    """The encoder's transformer layers: the list and its path inside the encoder (e.g. `encoder.layer`)."""

    path: str
    modules: torch.nn.ModuleList


def unwrap(model: Any) -> Any:
    """The task model inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encoder_of(model: Any) -> torch.nn.Module:
    """The encoder (transformers' base model) inside a task model: model.bert, model.roberta, model.model, ..."""
    inner = unwrap(model)
    return getattr(inner, inner.base_model_prefix)


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    module: Any = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    module = getattr(module, "original_module", module)  # peft wraps a module it trains and saves
    return module if isinstance(module, torch.nn.Module) else None


class Family:
    """The interface of a model family; subclasses set the class attributes and override what differs."""

    name: str = ""
    """The registry key, as transformers names the model type (`bert`, `xlm-roberta`, ...)."""
    model_types: tuple[str, ...] = ()
    """The `config.model_type` values this family covers (default: its name)."""
    known: bool = True
    """False only for the stand-in used with a model type no family covers (`finetune.families.generic`)."""
    extra_embeddings: tuple[str, ...] = ()
    """Modules inside the encoder, beside the one holding the input embeddings, that belong to the embeddings
    (depth 0 for freezing and layer-wise learning rates): ELECTRA's projection, DeBERTa's relative positions."""
    head_pooler: str | None = None
    """A module inside the encoder that only the task heads read (BERT's pooler: dense + tanh on the first token).
    It counts as the head: it trains whatever is frozen, and an adapter saves it with the head."""
    pooling_key: str | None = None
    """The config key holding the family's own pooling choice (ModernBERT, EuroBERT: `classifier_pooling`)."""
    pooling_values: Mapping[str, str] = {}
    """`model.pooling` -> the value of `pooling_key` that does it (e.g. first -> cls)."""
    first_token_pooling: tuple[str, ...] = ()
    """Values of `pooling_key` with which the head reads only the first token."""
    attention_dropout_key: str | None = "attention_probs_dropout_prob"
    """The config key of the dropout on attention probabilities (`model.attention_dropout`)."""
    lora_targets: tuple[str, ...] = ()
    """Default LoRA targets: the attention projections adapted when the recipe names none."""
    mlm_head: tuple[str, ...] = ()
    """The masked-LM model's module that first receives the encoder's last hidden states (the first one present),
    for the masked-positions shortcut (`finetune.tasks.masked_lm.MaskedPositions`)."""
    mlm_head_shared: tuple[str, ...] = ()
    """Prefixes of masked-LM weights that the task heads have under the same names (ModernBERT's `head.`): a model
    fine-tuned from a `finetune pretrain` output starts with them, as it would from the hub checkpoint."""
    bert_layout: Mapping[str, str] | None = None
    """For `finetune convert --to bigbird`: BERT's name of each layer weight -> this family's (`{}`: the layer)."""
    onnx_refusal: str | None = None
    """Why models of this family cannot be exported to ONNX (None: they can)."""
    description: str = ""
    """What checkpoints the family holds, for people (`finetune validate`)."""

    # --- from the config alone -------------------------------------------------------------
    def covers(self, model_type: str) -> bool:
        return model_type in (self.model_types or (self.name,))

    def layer_count(self, config: Any) -> int | None:
        """How many transformer layers the encoder has (None: the config does not say)."""
        value = getattr(config, "num_hidden_layers", None)
        return value if isinstance(value, int) else None

    def position_offset(self, config: Any) -> int:
        """Position embeddings an input can never use (RoBERTa counts positions from padding_idx + 1)."""
        return 0

    def usable_positions(self, config: Any) -> int | None:
        """The longest input in tokens the position embeddings allow (None: no learned positions limit it)."""
        positions = getattr(config, "max_position_embeddings", None)
        return positions - self.position_offset(config) if isinstance(positions, int) else None

    def pad_multiple(self, config: Any) -> int:
        """Batches are padded to a multiple of this many tokens (BigBird: its block size)."""
        return 1

    def check_settings(self, config: Any, model_cfg: Any) -> list[str]:
        """Problems between family-specific fields of the recipe's model section and the checkpoint (BigBird's)."""
        keys = ("attention_type", "block_size", "num_random_blocks", "sparse_attention_min_length")
        return [f"model.{key}: {getattr(model_cfg, key)!r} applies only to BigBird checkpoints; "
                f"{model_cfg.checkpoint} is {config.model_type}" for key in keys if getattr(model_cfg, key, None) is not None]

    def export_problem(self, config: Any) -> str | None:
        """Why a model of this family (with this config) cannot be exported to ONNX (None: it can)."""
        return self.onnx_refusal

    def has_head(self, config: Any, auto_model: str) -> bool:
        """Whether transformers has the task head (`auto_model`, e.g. AutoModelForQuestionAnswering) for this family."""
        from transformers.models.auto import modeling_auto

        return config.model_type in getattr(modeling_auto, HEAD_MAPPINGS[auto_model], {})

    # --- pooling -------------------------------------------------------------------------
    def pooling_problem(self, config: Any, asked: str) -> str | None:
        """Why `model.pooling: asked` cannot be done with this checkpoint (None: it can)."""
        return None

    def pooling_config(self, config: Any, asked: str) -> dict[str, Any]:
        """Config values that make the head pool as asked: the family's own key, or `finetune_pooling: mean` for heads
        that read the first token (`finetune.families.pooling` then puts the mean there)."""
        if asked == "auto":
            return {}
        if self.pooling_key is not None:
            return {self.pooling_key: self.pooling_values[asked]}
        return {POOLING_CONFIG_KEY: asked}

    def head_reads_first_token(self, config: Any) -> bool:
        """Whether a sequence head reads only the first position of the encoder's output (so a frozen encoder's
        outputs can be cached as one vector per text); False when it pools every position itself."""
        if self.pooling_key is None:
            return True
        return getattr(config, self.pooling_key, None) in self.first_token_pooling

    # --- structure, read from a built model ----------------------------------------------------
    def encoder(self, model: Any) -> torch.nn.Module:
        return encoder_of(model)

    def layers(self, encoder: torch.nn.Module, config: Any) -> Layers | None:
        """The encoder's layer list: the one `nn.ModuleList` in it with `num_hidden_layers` modules (None: not one)."""
        count = self.layer_count(config)
        found = [Layers(name, module) for name, module in encoder.named_modules()
                 if isinstance(module, torch.nn.ModuleList) and name and len(module) == count]
        return found[0] if len(found) == 1 else None

    def embeddings(self, encoder: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """The modules that embed the input (depth 0): the encoder's child holding the input embeddings, and
        `extra_embeddings`."""
        found: list[tuple[str, torch.nn.Module]] = []
        get_input = getattr(encoder, "get_input_embeddings", None)
        words = get_input() if callable(get_input) else None
        for name, child in encoder.named_children():
            if words is not None and any(m is words for m in child.modules()):
                found.append((name, child))
        for path in self.extra_embeddings:
            module = _get(encoder, path)
            if module is not None:
                found.append((path, module))
        return found

    def pooler(self, encoder: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The head's pooler inside the encoder as a function of the final hidden states (None: no such pooler)."""
        if self.head_pooler is None:
            return None
        return getattr(encoder, self.head_pooler, None)

    def mlm_head_module(self, mlm_model: Any) -> torch.nn.Module | None:
        """The module of a masked-LM model that receives the encoder's last hidden states (None: unknown)."""
        inner = unwrap(mlm_model)
        return next((m for m in (_get(inner, name) for name in self.mlm_head) if m is not None), None)

    # --- dropping layers (`finetune convert --to fewer-layers`) ---------------------------------
    def layer_selection_problem(self, layers: list[int], config: Any) -> str | None:
        """Why keeping these layers (in this order) would not give a working model (None: it would)."""
        return None

    def select_layers(self, config: Any, layers: list[int]) -> None:
        """Update a config for a model keeping only `layers`, in that order: the layer count and every per-layer
        list the config holds (ModernBERT's `layer_types`)."""
        per_layer = getattr(config, "layer_types", None)
        if isinstance(per_layer, list) and len(per_layer) == self.layer_count(config):
            config.layer_types = [per_layer[i] for i in layers]
        config.num_hidden_layers = len(layers)

    def __repr__(self) -> str:
        return f"<family {self.name}>"
