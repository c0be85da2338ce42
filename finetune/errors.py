"""Errors meant for a person: each message names what is wrong and what is allowed instead.

Everything finetune raises for bad input (a recipe field, a data file, a checkpoint, a model source, an
export that would answer differently) derives from `FinetuneError`; the command line prints its message
and exits with status 2, and anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """A failure the user can act on; the message says what to do."""


class RecipeError(FinetuneError, ValueError):
    """A recipe that cannot be used; the message names the field, the value and what is allowed."""


class DataError(FinetuneError, ValueError):
    """Data that does not fit the recipe; the message names the column, the value and what is allowed.

    Several problems found at once (every missing file, every missing column) are kept apart in `problems`,
    so `finetune validate` lists each one.
    """

    def __init__(self, *problems: str):
        self.problems = list(problems)
        if len(problems) > 1:
            super().__init__(f"{len(problems)} problems with the data:\n" + "\n".join(f"  - {p}" for p in problems))
        else:
            super().__init__(*problems)


class CheckpointError(FinetuneError, RuntimeError):
    """A checkpoint or model folder that cannot be found or may not be loaded; the message says what to do."""


class ModelSourceError(FinetuneError, ValueError):
    """A model source (folder, run id, runs:/ or models:/ URI) that cannot be found or loaded."""


class StoreError(FinetuneError, RuntimeError):
    """An MLflow tracking store that is not there; the message names it and says how to point at another."""


class TrainingDiverged(FinetuneError, RuntimeError):
    """The loss stopped being a finite number; the message gives the step and what to try."""


class ExportError(FinetuneError, RuntimeError):
    """An export that cannot be made, or that would answer differently from the trained model."""


class ConversionError(FinetuneError, RuntimeError):
    """A checkpoint conversion that cannot be made, or that would not reproduce its source."""


class InputError(FinetuneError, ValueError):
    """One request input the model cannot read; `index` is its position, the message says what is expected."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class EvaluationError(FinetuneError, ValueError):
    """An evaluation that cannot be made: data that does not fit the model, a metric that does not load or fit."""
