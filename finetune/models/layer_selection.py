"""`finetune convert --to fewer-layers`: a smaller student that keeps chosen layers of an encoder checkpoint.

DistilBERT was initialised this way, with every other layer of BERT-base. Everything outside the encoder
layers (embeddings, pooler, a fine-tuned head) is kept as it is, and the kept layers are renumbered 0, 1, ...
in the order given, so `--layers 0,2,4` of a 6-layer model makes a 3-layer one whose layer 1 is the source's
layer 2. The source may be a pretrained checkpoint or a fine-tuned model folder (a teacher): its head then
starts the student too. The result is checked before it is put in place: reloaded from disk, it must have
every weight the source had except the dropped layers', each kept layer exactly its source layer.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ConversionError
from finetune.families import family_of
from finetune.models.conversion_folder import checked_source, publish, staging_folder



def layer_key(path: str) -> re.Pattern:
    """`<prefix><path>.<N>.<rest>`: the weights of layer N, the layer list at `path` inside the encoder (BERT's
    encoder.layer, DistilBERT's transformer.layer, ModernBERT's layers), under the base model's name when the
    checkpoint has a head (bert., model.)."""
    return re.compile(rf"^(?P<prefix>(?:.+\.)?{re.escape(path)}\.)(?P<index>\d+)\.(?P<rest>.+)$")


def layers_path(config: Any, source: str) -> str:
    """Where the checkpoint's encoder keeps its layer list, read from the model its config builds (on the meta
    device: no weights); a ConversionError saying why when there is no single list of its layers."""
    import torch
    from transformers import AutoModel

    family = family_of(config)
    with torch.device("meta"):
        encoder = AutoModel.from_config(config)
    found = family.layers(encoder, config)
    if found is None:
        raise ConversionError(f"cannot tell the layers of {source} apart: its {config.model_type} encoder has no single "
                              f"list of its {family.layer_count(config)} layers, so there is nothing to choose from")
    return found.path


def parse_layers(text: str) -> list[int]:
    """`0,2,4` -> [0, 2, 4], refusing anything else with the form expected."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConversionError(f"--layers: {text!r}; expected layer numbers separated by commas, e.g. 0,2,4") from None
    if not layers:
        raise ConversionError("--layers: no layer given; expected layer numbers separated by commas, e.g. 0,2,4")
    return layers


def check_layers(layers: list[int], available: int, source: str) -> None:
    """Refuse layer numbers the source does not have (naming the ones it has), repeats, and keeping all of them."""
    wrong = [n for n in layers if not 0 <= n < available]
    if wrong:
        raise ConversionError(f"--layers: {', '.join(map(str, wrong))} {'is not a layer' if len(wrong) == 1 else 'are not layers'} "
                              f"of {source}, which has layers 0 to {available - 1} ({available} layers)")
    repeated = sorted({n for n in layers if layers.count(n) > 1})
    if repeated:
        raise ConversionError(f"--layers: {', '.join(map(str, repeated))} given more than once; each layer can be kept once")


def _read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    for file in files:
        state.update(load_file(str(file)))
    if not files and allow_pickle:
        for file in sorted(path.glob("*.bin")):
            # weights_only: tensors and plain containers only, never arbitrary objects.
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def selected_state(state: dict[str, torch.Tensor], layers: list[int], path: str) -> dict[str, torch.Tensor]:
    """The weights with only the chosen layers (of the layer list at `path`), renumbered in the order given;
    everything else unchanged."""
    pattern = layer_key(path)
    prefixes = {m.group("prefix") for m in map(pattern.match, state) if m}
    if len(prefixes) != 1:
        found = ", ".join(sorted(prefixes)) or "none"
        raise ConversionError(f"cannot tell the encoder layers' weights apart (looked for one `...{path}.N.` prefix; "
                              f"found: {found})")
    new = {}
    for key, tensor in state.items():
        match = pattern.match(key)
        if match is None:
            new[key] = tensor
        elif int(match.group("index")) in layers:
            position = layers.index(int(match.group("index")))
            new[f"{match.group('prefix')}{position}.{match.group('rest')}"] = tensor
    return new


def _load_info(path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(path, use_safetensors=None, output_loading_info=True)
    return model.state_dict(), set(info["missing_keys"])


def select_layers(source: str, target: str | Path, layers: list[int], allow_pickle: bool = False,
                  overwrite: bool = False) -> dict[str, Any]:
    """Write a checkpoint with only `layers` of `source` to `target` (checked on reload); returns the report.

    `source` resolves like a recipe's model.checkpoint; the folder is written beside `target` and moved into
    place only after the check passed.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    started = time.perf_counter()
    target, resolved, config = checked_source(source, target, overwrite, allow_pickle)
    family = family_of(config)
    available = family.layer_count(config)
    path = layers_path(config, source)
    check_layers(layers, available, source)
    problem = family.layer_selection_problem(layers, config)
    if problem:
        raise ConversionError(f"--layers: {problem}")
    state = _read_weights(resolved.path, allow_pickle)
    new = selected_state(state, layers, path)
    family.select_layers(config, layers)

    with staging_folder(target) as tmp:
        config.save_pretrained(tmp)
        # Tied weights share storage; safetensors writes each tensor once, so each gets its own copy.
        save_file({k: v.detach().clone().contiguous() for k, v in new.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(resolved.path).save_pretrained(tmp)
        # Checked on the saved folder through transformers, which is how recipes will load it.
        source_state, source_missing = _load_info(resolved.path)
        student_state, student_missing = _load_info(tmp)
        if student_missing - source_missing:
            raise ConversionError(f"the student reloads with weights missing: {sorted(student_missing - source_missing)}")
        if AutoConfig.from_pretrained(tmp).num_hidden_layers != len(layers):
            raise ConversionError("the saved student does not have the number of layers asked for")
        pattern = layer_key(path)
        for key, tensor in student_state.items():
            if key in student_missing:  # not in either folder (RoBERTa's pooler, which its classifier has not): random
                continue
            match = pattern.match(key)
            origin = key if match is None else \
                f"{match.group('prefix')}{layers[int(match.group('index'))]}.{match.group('rest')}"
            if origin not in source_state or not torch.equal(source_state[origin], tensor):
                raise ConversionError(f"the student's {key} is not the source's {origin}")
        report = {
            "source": source, "source_path": str(resolved.path), "source_type": config.model_type,
            "target": str(target), "to": "fewer-layers", "source_layers": available, "layers_kept": layers,
            "weights_copied": len(new), "parameters": sum(t.numel() for t in new.values()),
            "source_parameters": sum(t.numel() for t in state.values()),
        }
        return publish(tmp, target, report, started)
