"""Metrics beyond a task's own, through Hugging Face `evaluate`: `task.extra_metrics` in a recipe, `--metric`.

A spec is `NAME_OR_PATH[,config=CONFIG][,KEY=VALUE...]`: a hub metric name (`f1`), the path of a local
metric module (a folder NAME holding NAME.py), or `finetune:<task>` for one of the modules finetune ships
(finetune/evaluation/metric_modules, the task's own metrics); `config` is the module's configuration (`f1,
config=multilabel`) and the other pairs go to `compute` (`f1,average=macro`). Each is computed on what the task
hands `evaluate` metrics (`Task.metric_inputs`: class ids, 0/1 rows, numbers, tag lists, SQuAD dicts) and
logged as `<label>/<key>`, e.g. `eval/f1_macro/f1`.

Only the packaged modules load by default. A hub name or a local path names a Python script that `evaluate.load`
imports and runs (a hub name fetches it from the Hugging Face hub, or takes a folder of that name in the working
directory), and a recipe or a command line is data: running code from it needs the opt-in, `task.allow_metric_code:
true` in the recipe or `finetune evaluate --allow-metric-code`, as `model.trust_remote_code` is for a model's code.
`check_specs` says what is refused before anything loads (`finetune validate` reports the same).

`evaluate.load` fetches a metric named by its hub name from the Hugging Face hub; without network that fails,
and the message says to pass a path instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from finetune.errors import EvaluationError
from finetune.files import parse_scalar, short
from finetune.tasks import Reference, Task, TaskSettings

MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"
PACKAGED_PREFIX = "finetune:"
RECIPE_OPT_IN = "task.allow_metric_code: true"
CLI_OPT_IN = "--allow-metric-code"
MAX_SPEC_CHARS = 1000
"""The longest metric spec read: a name or path and a few arguments."""
_SHIPPED_NAME = re.compile(r"[a-z][a-z_]{0,63}")


def packaged_module(task_name: str) -> Path:
    """The folder of the `evaluate` module finetune ships for a task's metrics."""
    return MODULES_DIR / task_name


def shipped_modules() -> list[str]:
    """The task names whose metric module finetune ships (`finetune:<task>`)."""
    return sorted(p.name for p in MODULES_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def _is_shipped(wanted: str) -> bool:
    # A name, never a path: `finetune:../x` or `finetune:/tmp/x` must not reach a module outside MODULES_DIR.
    return bool(_SHIPPED_NAME.fullmatch(wanted)) and wanted in shipped_modules()


@dataclass(frozen=True)
class MetricSpec:
    """One extra metric: which module, its configuration, and the keyword arguments of `compute`."""

    name: str
    config: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def packaged(self) -> bool:
        """Whether it names a module finetune ships (`finetune:<task>`), the only ones loaded without the opt-in."""
        return self.name.startswith(PACKAGED_PREFIX)

    @property
    def location(self) -> str:
        """What `evaluate.load` is given: a hub name or a local path."""
        if self.name.startswith(PACKAGED_PREFIX):
            return str(packaged_module(self.name.removeprefix(PACKAGED_PREFIX)))
        return self.name

    @property
    def label(self) -> str:
        """The prefix of its logged metrics: the module's name, then the configuration and argument values."""
        base = Path(self.name.removeprefix(PACKAGED_PREFIX).rstrip("/")).name.removesuffix(".py")
        parts = [base, *([self.config] if self.config else []), *(str(v) for v in self.args.values())]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(parts))


def parse_spec(text: str) -> MetricSpec:
    """`NAME_OR_PATH[,config=CONFIG][,KEY=VALUE...]`; values are read as numbers, true/false, null or text
    (`finetune.files.parse_scalar`: never YAML, so a value cannot expand or nest)."""
    text = str(text)
    if len(text) > MAX_SPEC_CHARS:
        raise EvaluationError(f"metric {short(text)!r}: {len(text)} characters; a spec is at most {MAX_SPEC_CHARS}")
    name, *pairs = [p.strip() for p in text.split(",")]
    if not name:
        raise EvaluationError(f"metric {text!r}: give a hub metric name, a path or finetune:<task> first")
    config, args = None, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EvaluationError(f"metric {text!r}: {pair!r} is not KEY=VALUE; a spec is "
                                  "NAME_OR_PATH[,config=CONFIG][,KEY=VALUE...]")
        if key.strip() == "config":
            config = value.strip()
        else:
            args[key.strip()] = parse_scalar(value) if value.strip() else ""
    return MetricSpec(name, config, args)


def spec_problem(spec: MetricSpec, allow_code: bool) -> str | None:
    """Why a spec may not be loaded (None when it may): a packaged name finetune does not ship, or, without the
    opt-in, anything but a packaged module. Nothing is loaded or looked up on disk but finetune's own modules."""
    if spec.packaged:
        wanted = spec.name.removeprefix(PACKAGED_PREFIX)
        if not _is_shipped(wanted):
            return (f"metric {short(spec.name)!r}: finetune ships no module {short(wanted)!r}; it ships "
                    f"{', '.join(PACKAGED_PREFIX + s for s in shipped_modules())}")
        return None
    if not allow_code:
        return (f"metric {short(spec.name)!r} names a metric script (a hub metric, or a local module or .py file), "
                f"which evaluate.load would import and run; a recipe or command line runs no code unless it opts in "
                f"with {RECIPE_OPT_IN} (recipe) or {CLI_OPT_IN} (finetune evaluate). Without it only the modules "
                f"finetune ships load: {', '.join(PACKAGED_PREFIX + s for s in shipped_modules())}")
    return None


def check_specs(specs: Sequence[str], allow_code: bool = False) -> list[str]:
    """Every problem of these specs (parsing, an unknown packaged module, code without the opt-in), without loading
    anything: what `finetune validate` reports, and what ExtraMetrics raises before loading."""
    problems = []
    for text in specs:
        try:
            problem = spec_problem(parse_spec(text), allow_code)
        except EvaluationError as e:
            problem = str(e)
        if problem:
            problems.append(problem)
    return problems


def _load(spec: MetricSpec, task: Task | None) -> Any:
    import evaluate

    try:
        # keep_in_memory: the predictions stay in this process instead of Arrow files under ~/.cache.
        return evaluate.load(spec.location, spec.config, keep_in_memory=True)
    except Exception as e:  # evaluate raises FileNotFoundError, ConnectionError, ImportError... for "cannot load"
        first = str(e).splitlines()[0][:300] if str(e) else ""
        if Path(spec.location).exists():
            raise EvaluationError(f"metric {spec.name!r}: the module at {spec.location} does not load "
                                  f"({type(e).__name__}: {first})") from None
        if "/" in spec.location or spec.location.startswith(".") or spec.location.endswith(".py"):
            raise EvaluationError(f"metric {spec.name!r}: there is no metric module at {Path(spec.location).resolve()} "
                                  "(a module is a folder NAME holding NAME.py, or the NAME.py file itself)") from None
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_EVALUATE_OFFLINE")
        raise EvaluationError(
            f"metric {spec.name!r}: cannot load it ({type(e).__name__}: {first}). evaluate.load fetches a metric "
            f"named by its hub name from the Hugging Face hub, which {'offline mode (HF_HUB_OFFLINE) forbids' if offline else 'this machine cannot reach'}; "
            f"pass the path of a local metric module instead (a folder NAME holding NAME.py, e.g. a copy of the "
            f"hub's metric), or finetune:<task> for the task metrics finetune ships"
            + (f" (finetune:{task.name})" if task is not None and packaged_module(task.name).is_dir() else "")
        ) from None


def flatten_scores(result: Any, prefix: str) -> dict[str, float]:
    """The numbers of a `compute` result as `prefix/key` (nested dicts as `prefix/outer/inner`); the rest is dropped."""
    scores: dict[str, float] = {}
    if isinstance(result, dict):
        for key, value in result.items():
            scores |= flatten_scores(value, f"{prefix}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(key))}")
    elif isinstance(result, (bool, np.bool_)):
        scores[prefix] = float(result)
    elif isinstance(result, (int, float, np.integer, np.floating)):
        scores[prefix] = float(result)
    elif isinstance(result, np.ndarray) and result.size == 1:
        scores[prefix] = float(result.reshape(-1)[0])
    return scores


class ExtraMetrics:
    """The extra metrics of a recipe or a command line, loaded once (so a bad name fails before any training)."""

    def __init__(self, specs: Sequence[str], task: Task | None = None, allow_code: bool = False):
        """allow_code: the opt-in (`task.allow_metric_code`, `--allow-metric-code`) to load hub metrics and local
        modules, whose scripts run in this process; without it only `finetune:<task>` modules load."""
        problems = check_specs(specs, allow_code)
        if problems:  # all of them at once, before any module is loaded
            raise EvaluationError("\n".join(problems))
        self.specs = [parse_spec(s) for s in specs]
        labels = [s.label for s in self.specs]
        self.labels = [label if labels.count(label) == 1 else f"{label}_{i + 1}" for i, label in enumerate(labels)]
        self.modules = [_load(spec, task) for spec in self.specs]

    def __bool__(self) -> bool:
        return bool(self.specs)

    def compute(self, task: Task, outputs: Any, reference: Reference, settings: TaskSettings) -> dict[str, float]:
        """Every extra metric on one evaluation's outputs, as `<label>/<key>` numbers."""
        if not self.specs:
            return {}
        inputs = task.metric_inputs(outputs, reference, settings)
        scores: dict[str, float] = {}
        for spec, label, module in zip(self.specs, self.labels, self.modules):
            try:
                result = module.compute(**inputs, **spec.args)
            except Exception as e:  # a metric that does not fit the task's inputs (or a wrong argument)
                raise EvaluationError(
                    f"metric {spec.name!r} cannot score {task.name} outputs ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:300] if str(e) else ''}); it is given {sorted(inputs)} in the form "
                    f"Task.metric_inputs describes (e.g. {_example(inputs)})") from None
            scores |= flatten_scores(result, label)
        return scores


def _example(inputs: dict[str, list]) -> str:
    return ", ".join(f"{k}[0]={v[0]!r}"[:120] for k, v in inputs.items() if v)
