"""`finetune sweep`: several trials of one recipe as nested MLflow runs under one parent run.

Grid mode tries every combination of `--grid key=v1,v2,...`; search mode lets Optuna's TPE sampler,
seeded from `training.seed`, sample `--search key=SPACE` for `--trials` trials, pruning trials whose evaluation metric lags (Optuna's
median pruner, fed at every evaluation). With `--storage` (e.g. a database URL) several workers
share one study. The parent run logs the best trial, its score and its recipe.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import mlflow

from finetune.config.recipe import load_recipe, recipe_to_yaml
from finetune.errors import RecipeError
from finetune.tasks import get_task
from finetune.tracking.tracker import tracking_uri, use_experiment

SPACE_HELP = "KEY=float:LOW:HIGH, KEY=logfloat:LOW:HIGH, KEY=int:LOW:HIGH or KEY=choice:A,B,C"


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`key=v1,v2` items -> [(key, [v1, v2])]; values stay text and are typed as overrides later."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise RecipeError(f"--grid {item!r} must look like section.key=v1,v2,...")
        grid.append((key.strip(), [v.strip() for v in values.split(",")]))
    return grid


def parse_space(item: str) -> tuple[str, str, list[str]]:
    key, sep, spec = item.partition("=")
    kind, _, rest = spec.partition(":")
    if not sep or kind not in ("float", "logfloat", "int", "choice") or not rest:
        raise RecipeError(f"--search {item!r}: expected {SPACE_HELP}")
    return key.strip(), kind, rest.split(",") if kind == "choice" else rest.split(":")


def _run_trial(path: str, overrides: list[str], trial_overrides: list[str], index: int, on_evaluate=None,
               report=None):
    from finetune.training import train

    recipe = load_recipe(path, [*overrides, *trial_overrides])
    recipe.output_dir = f"{recipe.output_dir}/trial-{index}"
    recipe.tracking.run_name = f"trial-{index}"
    return recipe, train.main(recipe, nested=True, hooks=train.TrainingHooks(on_evaluate=on_evaluate), report=report)


def sweep(path: str, overrides: list[str], grid: list[str], search: list[str], trials: int,
          storage: str | None = None, study_name: str | None = None, report=None,
          say=print) -> dict[str, Any]:
    """Run the trials; returns the best trial's run id, score and overrides. Each trial tells `report` (a
    `RunReport`) what it does; `say` prints the sweep's own lines."""
    base = load_recipe(path, overrides)  # fail on a bad recipe before any run starts
    task = get_task(base.task.type)
    metric = base.task.metric_for_best
    greater = task.greater_is_better(metric)
    for item in grid:  # check every key and value now, not in trial 7
        key, values = parse_grid([item])[0]
        for value in values:
            load_recipe(path, [*overrides, f"{key}={value}"])
    results: list[tuple[float, str, list[str], str]] = []
    from finetune.training import outputs

    if outputs.may_claim(base.output_dir):  # the trials' parent folder is finetune's too (a foreign one is left unmarked)
        outputs.claim(Path(base.output_dir), base.name, "", kind="sweep")
    mlflow.set_tracking_uri(tracking_uri(base))
    use_experiment(base.tracking.experiment or base.name)
    with mlflow.start_run(run_name=f"sweep-{base.name}", tags={"finetune.sweep_parent": "true",
                                                               "finetune.task": base.task.type}) as parent:
        mlflow.log_params({"sweep.mode": "grid" if grid else "search", "sweep.metric": metric,
                           "sweep.grid": " ".join(grid)[:6000], "sweep.search": " ".join(search)[:6000]})
        if grid:
            axes = parse_grid(grid)
            for index, combo in enumerate(itertools.product(*[values for _, values in axes])):
                trial_overrides = [f"{key}={value}" for (key, _), value in zip(axes, combo)]
                say(f"trial {index}: {' '.join(trial_overrides)}")
                recipe, result = _run_trial(path, overrides, trial_overrides, index, report=report)
                results.append((result.best_metrics[metric], result.run_id, trial_overrides, recipe_to_yaml(recipe)))
        else:
            results = _optuna_search(path, overrides, search, trials, metric, greater, storage, study_name, report, say)
        if not results:
            raise RecipeError("the sweep finished no trial")
        best = (max if greater else min)(results, key=lambda r: r[0])
        mlflow.log_metric(f"best/{metric}", best[0])
        mlflow.set_tags({"finetune.best_trial_run_id": best[1], "finetune.best_trial_overrides": " ".join(best[2])})
        mlflow.log_text(best[3], "best_trial_recipe.yaml")
        say(f"best trial: {metric} {best[0]:.4f} with {' '.join(best[2])} (run {best[1]}); sweep run {parent.info.run_id}")
        return {"parent_run_id": parent.info.run_id, "best_run_id": best[1], "best_score": best[0],
                "best_overrides": best[2], "trials": len(results)}


def sampler_seed(seed: int, storage: str | None) -> int:
    """The Optuna sampler's seed: the recipe's `training.seed`, so a sweep run again proposes the same trials.

    Workers sharing a study through `--storage` each get their own (the seed mixed with the host and process): with
    one seed they would all propose the same trials, and which worker takes which trial is a race anyway.
    """
    if storage is None:
        return seed
    import os
    import socket
    import zlib

    return zlib.crc32(f"{seed}|{socket.gethostname()}|{os.getpid()}".encode())


def _optuna_search(path, overrides, search, trials, metric, greater, storage, study_name, report=None, say=print):
    import optuna

    space = [parse_space(item) for item in search]
    if not space:
        raise RecipeError("finetune sweep needs --grid or --search")
    seed = sampler_seed(load_recipe(path, overrides).training.seed, storage)
    mlflow.log_param("sweep.sampler_seed", seed)
    study = optuna.create_study(
        direction="maximize" if greater else "minimize", storage=storage, study_name=study_name,
        load_if_exists=study_name is not None, pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    results = []

    def objective(trial: "optuna.Trial") -> float:
        trial_overrides = []
        for key, kind, args in space:
            if kind == "choice":
                value = trial.suggest_categorical(key, args)
            elif kind == "int":
                value = trial.suggest_int(key, int(args[0]), int(args[1]))
            else:
                value = trial.suggest_float(key, float(args[0]), float(args[1]), log=kind == "logfloat")
            trial_overrides.append(f"{key}={value}")

        def prune(step: int, metrics: dict[str, float]) -> bool:
            trial.report(metrics[metric], step)
            return trial.should_prune()

        say(f"trial {trial.number}: {' '.join(trial_overrides)}")
        recipe, result = _run_trial(path, overrides, trial_overrides, trial.number, on_evaluate=prune, report=report)
        if trial.should_prune():
            mlflow.MlflowClient().set_tag(result.run_id, "finetune.pruned", "true")
            raise optuna.TrialPruned()
        results.append((result.best_metrics[metric], result.run_id, trial_overrides, recipe_to_yaml(recipe)))
        return result.best_metrics[metric]

    study.optimize(objective, n_trials=trials)
    return results
