"""`finetune validate`: check a recipe, its checkpoint and its data without training.

It prints the resolved recipe, then goes as far as it can and names every problem at once: a checkpoint
that cannot be reached is reported and the data is still checked (without token statistics, which need the
tokenizer); every missing data file and every missing column is named. Any problem makes it exit non-zero.
The libraries' output is not shown (with --verbose it is).
"""

from __future__ import annotations

from typing import Any

from finetune.cli.console import capture, say
from finetune.config.recipe import Recipe, load_recipe, recipe_to_yaml
from finetune.data.features import length_stats
from finetune.data.loading import load_splits, missing_files
from finetune.errors import CheckpointError, DataError
from finetune.models import pretrained
from finetune.models.modeling import load_tokenizer
from finetune.tasks import get_task


def _check_checkpoint(recipe: Recipe, problems: list[str]) -> Any:
    try:
        resolved = pretrained.resolve_checkpoint(recipe.model.checkpoint, recipe.model.revision, recipe.model.allow_pickle)
        config = pretrained.load_config(resolved, recipe.model.trust_remote_code)
        pretrained.check_weights_format(resolved.path, recipe.model.allow_pickle)
    except CheckpointError as e:
        problems.append(str(e))
        return None
    family = config.model_type
    note = "" if family in pretrained.TESTED_FAMILIES else " (not one of the tested families; loaded through AutoModel)"
    say(f"checkpoint: {recipe.model.checkpoint} -> {resolved.path} [{resolved.source}], family {family}{note}, "
        f"{getattr(config, 'max_position_embeddings', '?')} positions")
    problems.extend(pretrained.check_model_settings(config, recipe.model))
    return load_tokenizer(resolved.path, recipe.model.trust_remote_code)


def validate(path: str, overrides: list[str], verbose: bool = False) -> int:
    """Validate and report; returns the process exit code (0 when everything checks out)."""
    recipe = load_recipe(path, overrides)  # schema errors raise RecipeError, reported by the CLI
    with capture(None, verbose):
        return _validate(recipe, path, overrides)


def _validate(recipe: Recipe, path: str, overrides: list[str]) -> int:
    task = get_task(recipe.task.type)
    say(f"# resolved recipe ({path})\n{recipe_to_yaml(recipe)}")
    say(f"recipe: {path} (name {recipe.name}, task {task.name}"
        f"{', sentence pairs' if recipe.data.text_pair_column else ''}, metric {recipe.task.metric_for_best})")
    problems: list[str] = []
    tokenizer = _check_checkpoint(recipe, problems)
    missing = missing_files(recipe.data)
    if missing:  # nothing can be read until every file is there
        return _report(problems + missing, path, overrides)
    try:
        label_names, train, evaluation, test = load_splits(recipe, task)
    except DataError as e:
        problems.extend(e.problems or [str(e)])
    else:
        carved = "" if str(evaluation.split) == recipe.data.eval_split \
            else f" (carved: {recipe.data.validation_size:.0%} of train)"
        say(f"data: train {len(train)}, eval {len(evaluation)}{carved}" + (f", test {len(test)}" if test is not None else ""))
        if label_names is not None:
            say(f"labels ({len(label_names)}): {', '.join(label_names)}")
        for name, split in (("train", train), ("eval", evaluation), ("test", test)):
            if split is None:
                continue
            say(f"  {name} label counts: {task.label_counts(split, label_names)}")
            if tokenizer is not None:
                s = length_stats(split, recipe, task, tokenizer)
                cut = (f"{s['multi_window_share']:.1%} of {s['unit']} "
                       f"need more than one window of max_length "
                       f"{recipe.model.max_length} (up to {s['windows_max']})" if "multi_window_share" in s else
                       f"{s['truncated_share']:.1%} truncated at max_length {recipe.model.max_length}")
                say(f"  {name} tokens: p50 {s['p50']}, p90 {s['p90']}, p95 {s['p95']}, p99 {s['p99']}, max {s['max']}; "
                    f"{cut}" + (f" (from a sample of {s['examples']})" if s["examples"] < len(split) else ""))
    return _report(problems, path, overrides)


def _report(problems: list[str], path: str, overrides: list[str]) -> int:
    if problems:
        say(f"\n{len(problems)} problem(s):")
        for p in problems:
            say(f"  - {p}")
        return 1
    say("\nOK: the recipe is ready to run:  finetune run " + path + "".join(f" {o}" for o in overrides))
    return 0
