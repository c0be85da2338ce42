"""Reading label values: class names or ids, multi-label lists, a stable label order."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from finetune.errors import DataError


def as_int(token: Any) -> int | None:
    """An integer label value (5, np.int64(5), "5", "-1"), or None for anything else (booleans included)."""
    if isinstance(token, (bool, np.bool_)):
        return None
    if isinstance(token, (int, np.integer)):
        return int(token)
    if isinstance(token, str) and token.strip().lstrip("-").isdigit():
        return int(token)
    return None


def sorted_values(values: Iterable[Any]) -> list[str]:
    """Stable label order: numerically when every value is an integer, else alphabetically."""
    values = set(values)
    if values and all(as_int(v) is not None for v in values):
        return [str(v) for v in sorted({as_int(v) for v in values})]
    return sorted(str(v) for v in values)


def class_id(value: Any, names: Sequence[str], index: dict[str, int], by_position: bool) -> int | None:
    """The id of one label value: its name, or (when names were given or come from a ClassLabel) its position."""
    if isinstance(value, str) and value in index:
        return index[value]
    number = as_int(value)
    if number is not None:
        if by_position:
            return number if 0 <= number < len(names) else None
        return index.get(str(number))
    return None


def at_least_two(values: set, data: Any, what: str = "label(s)", needs: str = "classification") -> None:
    """Refuse a train split whose label column has fewer than two distinct values."""
    if len(values) < 2:
        raise DataError(
            f"data.label_column: column {data.label_column!r} has {len(values)} distinct {what} "
            f"({sorted(map(str, values))}) in the train split; {needs} needs at least 2"
        )


def allowed_classes(label_names: Sequence[str], by_position: bool) -> str:
    return f"one of {list(label_names)}" + (f" or an id 0..{len(label_names) - 1}" if by_position else "")
