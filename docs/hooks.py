"""mkdocs hook: the reference pages, generated from the code at every build so they cannot go stale.

- reference/recipe.md: every recipe field from the pydantic schema (finetune/config/recipe.py), with its type or
  allowed values, default and docstring, the source `finetune fields` prints from.
- reference/commands.md: every command and flag from the argparse parser (finetune.cli.build_parser).
- reference/benchmarks.md: BENCHMARKS.md as it is in the repository.

The pages exist only in the built site (mkdocs.yml names this file under `hooks`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|").replace("\n", " ")


def recipe_reference() -> str:
    """Every recipe key, section by section: type or allowed values, default, meaning."""
    from pydantic import BaseModel

    from finetune.config.recipe import Recipe, _type_name, _unwrap_optional, ordered_fields
    from finetune.tasks import TASKS

    out = ["# Recipe reference", "",
           "Every key a recipe may set, generated from the schema in `finetune/config/recipe.py` when the site is "
           "built (`finetune fields` prints the same). Keys are written nested in the YAML or dotted on the command "
           "line (`training.learning_rate=3e-5`). Unknown keys are errors. See [Recipes](../guides/recipes.md).", ""]

    def section(model: type[BaseModel], prefix: str, title: str) -> None:
        rows, nested = [], []
        for name, field in ordered_fields(model).items():
            annotation = _unwrap_optional(field.annotation)
            dotted = f"{prefix}{name}"
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                nested.append((annotation, f"{dotted}.", f"`{dotted}`"))
                continue
            kind = " \\| ".join(TASKS) if dotted == "task.type" else _cell(_type_name(field.annotation))
            default = "required" if field.is_required() else f"`{_cell(json.dumps(field.default))}`"
            rows.append(f"| `{dotted}` | {kind} | {default} | {_cell(field.description or '')} |")
        if rows:
            out.extend([f"## {title}", "", "| key | type or values | default | meaning |", "|---|---|---|---|", *rows, ""])
        for sub, sub_prefix, sub_title in nested:
            section(sub, sub_prefix, sub_title)

    section(Recipe, "", "Top level")
    return "\n".join(out) + "\n"


def _flag_row(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.option_strings and action.nargs != 0:
        names += f" `{action.metavar or action.dest.upper()}`"
    if action.choices is not None:
        values = " \\| ".join(str(c) for c in action.choices)
    elif action.nargs in ("*", "+"):
        values = "one or more" if action.nargs == "+" else "any number"
    else:
        values = ""
    default = action.default
    shown = "" if default in (None, False, [], argparse.SUPPRESS) or action.nargs == 0 else f"`{_cell(default)}`"
    try:  # argparse expands %(default)s and the like in help texts; so does the page
        text = (action.help or "") % vars(action)
    except (KeyError, TypeError, ValueError):
        text = action.help or ""
    return f"| {names} | {_cell(values)} | {shown} | {_cell(text)} |"


def command_reference() -> str:
    """Every `finetune` command with its usage line and every argument and flag (from build_parser)."""
    from finetune.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    out = ["# Command reference", "",
           "Every `finetune` command and flag, generated from the command line's parser (`finetune/cli/__init__.py`) "
           "when the site is built; `finetune COMMAND --help` prints the same. What each command is for: "
           "[Commands at a glance](../commands.md).", ""]
    for name, command in sub.choices.items():
        usage = " ".join(command.format_usage().split())
        out += [f"## finetune {name}", "", _cell(helps.get(name) or ""), "", "```", usage.removeprefix("usage: "), "```", ""]
        actions = [a for a in command._actions
                   if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]
        if actions:
            out += ["| argument | values | default | meaning |", "|---|---|---|---|", *map(_flag_row, actions), ""]
        if name in ("run", "pretrain", "validate"):
            out += ["The recipe keys it takes as `KEY=VALUE`: [Recipe reference](recipe.md).", ""]
    return "\n".join(out) + "\n"


def benchmarks_page() -> str:
    """BENCHMARKS.md, whose figures the guides quote."""
    return (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")


GENERATED = {
    "reference/recipe.md": recipe_reference,
    "reference/commands.md": command_reference,
    "reference/benchmarks.md": benchmarks_page,
}


def on_files(files, config):
    """Add the generated reference pages to the site."""
    for uri, render in GENERATED.items():
        files.append(File.generated(config, uri, content=render()))
    return files
