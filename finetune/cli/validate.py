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
from finetune.errors import CheckpointError, DataError, RecipeError
from finetune.evaluation.extra_metrics import PACKAGED_PREFIX, check_specs
from finetune.families import family_of
from finetune.families.support import offers, recipe_problems
from finetune.models import pretrained
from finetune.models.modeling import load_tokenizer
from finetune.tasks import TaskSettings, get_task
from finetune.training.contrastive import few_labels_hint, label_sentences_line
from finetune.training.outputs import check_output_dir
from finetune.training.preflight import choose_mixed_precision


def _check_checkpoint(recipe: Recipe, problems: list[str]) -> tuple[Any, Any]:
    """Resolve and check `model.checkpoint`; returns its (tokenizer, config), or (None, None) if it cannot be used."""
    from finetune.models.adapters import is_adapter_folder
    from finetune.models.layers import check_freeze
    from finetune.tracking.tracker import tracking_uri
    from finetune.training.start import resolve_start

    try:
        start = resolve_start(recipe.model.checkpoint, recipe.model.revision, recipe.model.allow_pickle,
                              tracking_uri(recipe))
        resolved = start.resolved
        config = pretrained.load_config(resolved, recipe.model.trust_remote_code)
        if not is_adapter_folder(resolved.path):  # an adapter model's weights are its base's and its adapter's
            pretrained.check_weights_format(resolved.path, recipe.model.allow_pickle)
    except CheckpointError as e:
        problems.append(str(e))
        return None, None
    if start.parent is not None:
        print(f"starts from the fine-tuned {start.parent.task} model {start.parent_source} "
              f"(labels: {', '.join(start.parent.label_names or []) or 'none'})")
    problems.extend(check_freeze(recipe.training.freeze, config))
    family = family_of(config)
    positions = family.usable_positions(config)
    say(f"checkpoint: {recipe.model.checkpoint} -> {resolved.path} [{resolved.source}], family {family.name} "
        f"({family.description}), {positions if positions is not None else 'no limit of'} positions")
    if not family.known:
        _unknown_family(config)
    problems.extend(recipe_problems(config, recipe, get_task(recipe.task.type)))
    return load_tokenizer(resolved.path, recipe.model.trust_remote_code), config


def _unknown_family(config: Any) -> None:
    """What a checkpoint of a model type no family module covers can and cannot do, and why."""
    from finetune.families import FAMILIES
    from finetune.tasks import TASKS

    say(f"note: {config.model_type} is not one of the families finetune knows ({', '.join(FAMILIES)}); it loads "
        "through transformers' Auto classes and offers what can be read from the model:")
    for offer in offers(config, TASKS):
        say(f"  {'yes' if offer.reason is None else 'no '}  {offer.feature}" + (f": {offer.reason}" if offer.reason else ""))


def _check_teacher(recipe: Recipe, label_names: list[str] | None, student_config: Any, problems: list[str]) -> None:
    """A distillation teacher must exist and answer the same task and labels (its outputs are computed at `run`).

    student_config: the checkpoint's config as `_check_checkpoint` read it (None when it could not: then the hidden
    widths are not compared).
    """
    from finetune.tracking.tracker import tracking_uri
    from finetune.training.teacher import check_teacher, load_teacher

    try:
        teacher, _ = load_teacher(recipe.distillation.teacher, tracking_uri(recipe))
        check_teacher(teacher, recipe, label_names, None if student_config is None else student_config.hidden_size)
    except (RecipeError, CheckpointError) as e:
        problems.append(str(e))
        return
    say(f"teacher: {recipe.distillation.teacher} ({teacher.info.task}, {teacher.model.config.num_hidden_layers} layers)")


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
    # What `finetune run` refuses before it loads anything, so that validate and run agree.
    for check in (lambda: choose_mixed_precision(recipe.training.mixed_precision),
                  lambda: check_output_dir(recipe.output_dir, overwrite=False)):
        try:
            check()
        except RecipeError as e:
            problems.append(str(e))
    # The extra metrics as `run` would refuse them (code without task.allow_metric_code, a module finetune does not
    # ship), without loading any: loading one is running its script.
    problems.extend(check_specs(recipe.task.extra_metrics, recipe.task.allow_metric_code))
    scripts = [m for m in recipe.task.extra_metrics if not str(m).strip().startswith(PACKAGED_PREFIX)]
    if scripts and recipe.task.allow_metric_code:
        say("warning: task.allow_metric_code is on: the metric scripts of task.extra_metrics run in finetune's "
            "process at `finetune run` (validate does not load them)")
    tokenizer, student_config = _check_checkpoint(recipe, problems)
    missing = missing_files(recipe.data)
    if missing:  # nothing can be read until every file is there
        return _report(problems + missing, path, overrides)
    try:
        label_names, train, evaluation, test = load_splits(recipe, task)
    except DataError as e:
        problems.extend(e.problems or [str(e)])
    else:
        if recipe.distillation is not None:
            _check_teacher(recipe, label_names, student_config, problems)
        carved = "" if str(evaluation.split) == recipe.data.eval_split \
            else f" (carved: {recipe.data.validation_size:.0%} of train)"
        say(f"data: train {len(train)}, eval {len(evaluation)}{carved}" + (f", test {len(test)}" if test is not None else ""))
        if label_names is not None:
            say(f"labels ({len(label_names)}): {', '.join(label_names)}")
            named = label_sentences_line(recipe, label_names)
            if named:
                say(named)
        if tokenizer is not None:
            _tokenizer_fit(recipe, task, train, tokenizer)
        settings = TaskSettings.of(recipe.task)
        try:
            task.settings_for_training(settings, train, label_names)
        except RecipeError as e:
            problems.append(str(e))
        skew = task.skew_warning(train, label_names, settings)
        if skew:
            say(f"warning: {skew}")
        few = few_labels_hint(recipe, task.label_counts(train, label_names) if label_names is not None else {})
        if few:
            say(few)
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


def _tokenizer_fit(recipe: Recipe, task: Any, train: Any, tokenizer: Any) -> None:
    """How well the checkpoint's vocabulary fits the train texts, and the warning pointing to vocabulary adaptation
    when it fits poorly (`finetune.models.tokenizer_fit`); a warning, not a problem: the recipe can still run."""
    from finetune.models.tokenizer_fit import measure

    fit = measure(train, recipe, task, tokenizer)
    if fit is None:
        return
    say(fit.line())
    warning = fit.warning()
    if warning:
        say(f"warning: {warning}")


def _report(problems: list[str], path: str, overrides: list[str]) -> int:
    if problems:
        say(f"\n{len(problems)} problem(s):")
        for p in problems:
            say(f"  - {p}")
        return 1
    say("\nOK: the recipe is ready to run:  finetune run " + path + "".join(f" {o}" for o in overrides))
    return 0
