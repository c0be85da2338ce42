"""Each row of a batch through its own LoRA adapter, in one forward pass of a model holding several
(`finetune.models.adapters.SharedAdapters`).

peft's own way (`adapter_names`) runs, in every adapted layer, the base layer on the whole batch and then, adapter by
adapter, picks that adapter's rows, runs its two low-rank matrices on them and adds the result back: about five
operations per adapter per layer (a MiniLM batch mixing three adapters: 822 operations, against 154 for the plain
model). On a CPU each is a parallel region whose threads wait for each other, and a served model shares its cores
with the tokenising threads, the event loop and its clients, so many small operations cost more than their
arithmetic. Here every adapter's A matrices sit side by side in one matrix and their B matrices (scaling folded
in) in another, so an adapted layer is the base layer plus three operations whatever the number of adapters: all
rows through every A at once, a 0/1 mask that keeps each row's own adapter's columns, and all rows through every B
added onto the base output (337 operations for that batch). The extra arithmetic (every row through every
adapter's r columns) is small next to the base layer's while n x r stays well under the layer's width. Layers this
cannot express (a LoRA variant, a bias on B, a merged adapter, training mode) keep peft's way, row by row.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

# "peft" runs every layer peft's way, row by row: what bench/adapters.py compares the stacked update against.
WAY_VARIABLE = "FINETUNE_MIXED_LORA"


@contextlib.contextmanager
def rows_of_adapters(model: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within: each row of a batch runs through `model` (a PeftModel holding several adapters) with its own adapter,
    `names[i]`.

    Plain LoRA linear layers compute every row's low-rank update at once (`_stacked_forward`); any other LoRA layer
    gets peft's `adapter_names` argument, as peft's `model(..., adapter_names=...)` hands it to them. The task heads
    (`modules_to_save`) are routed here instead: peft 0.21 refuses a mixed batch in a saved module that is not a
    plain Linear, Embedding or Conv layer (`ModulesToSaveWrapper._mixed_batch_forward`), and BERT's pooler and
    RoBERTa's and ModernBERT's classification heads are not. A head computes each row on its own, so its output for
    the rows of another adapter is replaced by that adapter's copy of the head on those rows.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    names = list(names)
    stacked = os.environ.get(WAY_VARIABLE, "stacked") != "peft"
    handles, swapped = [], []
    masks: dict[tuple, torch.Tensor] = {}  # one per (column layout, rows, shape), shared by the layers of this batch
    try:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                stack = _stack_of(module) if stacked else None
                if stack is not None and "forward" not in module.__dict__:  # not patched by someone else
                    module.forward = functools.partial(_stacked_forward, module, stack, names, masks)
                    swapped.append(module)
                else:
                    handles.append(module.register_forward_pre_hook(functools.partial(_lora_rows, names=names),
                                                                    with_kwargs=True))
            elif isinstance(module, ModulesToSaveWrapper):
                handles.append(module.register_forward_hook(functools.partial(_head_rows, names=names),
                                                            with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in swapped:
            del module.forward  # the class's forward again


@dataclass(frozen=True)
class _Stack:
    """One LoRA linear layer's adapters side by side: `a` [sum of ranks, in], `b` [sum of ranks, out] with each
    adapter's scaling folded in; `spans` the columns of each adapter, by name; `sources` the weights (and their
    versions) they were copied from."""

    a: torch.Tensor
    b: torch.Tensor
    spans: tuple[tuple[str, int, int], ...]
    sources: tuple

    def built_from(self, parts: list[tuple[str, torch.Tensor, torch.Tensor, float]]) -> bool:
        """Whether the stack is a copy of these (adapter, A, B, scaling), as they are now: the same tensors (held
        here, so no other tensor can take their place), not written since (`_version` counts in-place writes)."""
        return len(parts) == len(self.sources) and all(
            n == m and a is a0 and a._version == va and b is b0 and b._version == vb and s == s0
            for (n, a, b, s), (m, a0, va, b0, vb, s0) in zip(parts, self.sources))


# Built once per layer and kept while its weights stay the same (`_Stack.built_from`): a server builds each stack
# on its first mixed batch.
_STACKS: "weakref.WeakKeyDictionary[torch.nn.Module, _Stack]" = weakref.WeakKeyDictionary()


def _stack_of(layer: Any) -> _Stack | None:
    """The layer's stack, or None where the layer is not a plain LoRA linear layer in inference."""
    if (layer.training or layer.merged or layer.disable_adapters or getattr(layer, "lora_variant", None)
            or getattr(layer, "fan_in_fan_out", False) or not isinstance(layer.get_base_layer(), torch.nn.Linear)
            or not layer.lora_A):
        return None
    adapters = sorted(layer.lora_A)
    parts = []
    for name in adapters:
        a, b = layer.lora_A[name], layer.lora_B[name] if name in layer.lora_B else None
        if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear) or a.bias is not None \
                or b.bias is not None:
            return None
        parts.append((name, a.weight, b.weight, float(layer.scaling[name])))
    stack = _STACKS.get(layer)
    if stack is None or not stack.built_from(parts):
        spans, start = [], 0
        for name, a, _, _ in parts:
            spans.append((name, start, start + a.shape[0]))
            start += a.shape[0]
        with torch.no_grad():
            stack = _Stack(a=torch.cat([a for _, a, _, _ in parts]).contiguous(),
                           b=torch.cat([(b * s).T for _, _, b, s in parts]).contiguous(),
                           spans=tuple(spans),
                           sources=tuple((n, a, a._version, b, b._version, s) for n, a, b, s in parts))
        _STACKS[layer] = stack
    return stack


def _stacked_forward(layer: Any, stack: _Stack, names: list[str], masks: dict, x: torch.Tensor, *args: Any,
                     **kwargs: Any) -> torch.Tensor:
    """The layer's output for rows of different adapters: base(x) + ((x A^T) * mask) B."""
    result = layer.base_layer(x, *args, **kwargs)
    rows = _per_row(names, len(x))
    low = F.linear(x.to(stack.a.dtype), stack.a)  # every adapter's A at once: [rows, ..., sum of ranks]
    key = (stack.spans, len(rows), x.dim(), low.dtype, low.device)
    mask = masks.get(key)
    if mask is None:
        mask = torch.zeros(len(rows), low.shape[-1])  # filled on the CPU: on a GPU each row would be a launch
        where = {name: (start, stop) for name, start, stop in stack.spans}
        for i, name in enumerate(rows):
            if name in where:  # a row of no adapter here ("__base__", as peft has it) keeps the base output
                mask[i, slice(*where[name])] = 1
        mask = mask.view(len(rows), *([1] * (x.dim() - 2)), -1).to(device=low.device, dtype=low.dtype)
        masks[key] = mask
    low = low * mask
    out = result.shape[-1]
    return torch.addmm(result.reshape(-1, out), low.reshape(-1, low.shape[-1]),
                       stack.b).view(result.shape).to(result.dtype)


def _per_row(names: list[str], rows: int) -> list[str]:
    """The adapter of each of `rows` rows: multiple choice runs the choices of an input as consecutive rows."""
    if rows == len(names):
        return names
    if not names or rows % len(names):
        raise ValueError(f"{rows} rows for {len(names)} adapter names")
    return [n for n in names for _ in range(rows // len(names))]


def _lora_rows(module: Any, args: tuple, kwargs: dict, names: list[str]) -> tuple[tuple, dict]:
    x = args[0] if args else kwargs["x"]
    return args, {**kwargs, "adapter_names": _per_row(names, len(x))}


def _head_rows(module: Any, args: tuple, kwargs: dict, output: Any, names: list[str]) -> Any:
    if not args or not isinstance(output, torch.Tensor):  # every head finetune saves takes and gives one tensor
        raise ValueError(f"{type(module.original_module).__name__}: a head that cannot be run row by row")
    rows = _per_row(names, len(args[0]))
    active = module.active_adapters[0]
    for adapter in sorted(set(rows) - {active}):
        idx = [i for i, n in enumerate(rows) if n == adapter]
        output[idx] = module.modules_to_save[adapter](args[0][idx], *args[1:], **kwargs).to(output.dtype)
    return output
