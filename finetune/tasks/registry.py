"""The registry of downstream tasks: `task.type` in a recipe names one of these (never an import path)."""

from __future__ import annotations

from typing import Any

# Values are finetune.tasks.base.Task instances (not imported here: the base module reads this registry).
TASKS: dict[str, Any] = {}


def register_task(task: Any) -> Any:
    """Make a task available to recipes (`task.type: <its name>`), training, evaluation and serving."""
    if not task.name or not task.name.isidentifier():
        raise ValueError(f"a task needs a name that is an identifier, got {task.name!r}")
    if task.default_metric not in task.metrics:
        raise ValueError(f"task {task.name}: default_metric {task.default_metric!r} is not one of its metrics "
                         f"({', '.join(task.metrics)})")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Any:
    """Look a task up by name, with a message that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
