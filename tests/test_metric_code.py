"""Metric specs are data (issue 33, class 1): a spec names a script only with the opt-in, `task.allow_metric_code`
in a recipe or `finetune evaluate --allow-metric-code`; without it only the modules finetune ships load, and
`finetune validate`, `finetune run` and `finetune evaluate` refuse the same specs before anything is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.cli import main
from finetune.errors import EvaluationError
from finetune.evaluation import extra_metrics
from finetune.evaluation.extra_metrics import ExtraMetrics, check_specs, parse_spec
from tests.conftest import tiny_recipe, write_recipe

OPT_IN = "task.allow_metric_code: true"


def _planted_module(root: Path, name: str = "planted") -> tuple[Path, Path]:
    """A valid `evaluate` metric module whose import leaves a marker file: (its folder, the marker)."""
    marker = root / f"{name}-ran"
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{name}.py").write_text(f'''
import pathlib
pathlib.Path({str(marker)!r}).write_text("imported")
import datasets
import evaluate


class Planted(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="", citation="", inputs_description="", features=datasets.Features(
            {{"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}}))

    def _compute(self, predictions, references):
        return {{"count": len(predictions)}}
''')
    return folder, marker


@pytest.fixture
def no_load(monkeypatch):
    """evaluate.load made to fail the test if anything reaches it."""
    import evaluate

    def refuse(*args, **kwargs):
        raise AssertionError(f"evaluate.load was called with {args}")

    monkeypatch.setattr(evaluate, "load", refuse)


@pytest.mark.parametrize("spec", ["accuracy", "f1,average=macro", "evaluate-metric/accuracy", "./mine", "mine.py",
                                  "/tmp/anything/metric.py", "user/space-metric,config=x"])
def test_scripts_are_refused_without_the_opt_in_and_nothing_loads(spec, no_load):
    with pytest.raises(EvaluationError) as refused:
        ExtraMetrics([spec])
    message = str(refused.value)
    assert OPT_IN in message and "--allow-metric-code" in message and "finetune:classification" in message


@pytest.mark.parametrize("spec", ["finetune:../../../../tmp/x", "finetune:/tmp/x", "finetune:classification/..",
                                  "finetune:Classification", "finetune:", "finetune:metric_modules"])
def test_packaged_names_are_names_never_paths(spec, no_load):
    # Not even the opt-in turns `finetune:` into a path: it names a module finetune ships or nothing.
    for allow in (False, True):
        with pytest.raises(EvaluationError, match="finetune ships no module"):
            ExtraMetrics([spec], allow_code=allow)


def test_a_local_module_runs_only_with_the_opt_in(tmp_path):
    folder, marker = _planted_module(tmp_path)
    for spec in (str(folder), str(folder / "planted.py")):
        with pytest.raises(EvaluationError, match="allow_metric_code"):
            ExtraMetrics([spec])
        assert not marker.exists(), spec
    extra = ExtraMetrics([str(folder)], allow_code=True)
    assert marker.exists()
    assert extra.modules[0].compute(predictions=[1, 0], references=[1, 1]) == {"count": 2}


def test_shipped_modules_load_without_the_opt_in():
    extra = ExtraMetrics(["finetune:classification", "finetune:regression,config=default"])
    assert extra.labels == ["classification", "regression_default"] and len(extra.modules) == 2


def test_every_refused_spec_is_named_at_once(no_load):
    problems = check_specs(["finetune:classification", "f1", "finetune:nope", "x,broken"])
    assert len(problems) == 3
    assert "'f1'" in problems[0] and "finetune ships no module 'nope'" in problems[1] and "is not KEY=VALUE" in problems[2]
    assert check_specs(["f1", "./m"], allow_code=True) == []


@pytest.mark.parametrize("value,expected", [
    ("macro", "macro"), ("3", 3), ("0.5", 0.5), ("true", True), ("null", None),
    ("&a [*a]", "&a [*a]"), ("[1]", "[1]"), ("*a", "*a"), ("!!python/object/apply:os.system", "!!python/object/apply:os.system"),
    ("{a: [b]}", "{a: [b]}"), ("[1", "[1"), (".inf", ".inf"),
])
def test_spec_values_are_scalars_never_yaml(value, expected):
    spec = parse_spec(f"finetune:classification,k={value}")
    assert spec.args["k"] == expected  # the text, never a YAML structure, alias or tag


def test_long_specs_are_refused():
    with pytest.raises(EvaluationError, match="a spec is at most 1000"):
        parse_spec("finetune:classification,average=" + "a" * 2000)


def test_validate_reports_the_refusal_without_loading(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    folder, marker = _planted_module(tmp_path)
    loaded = []
    monkeypatch.setattr(extra_metrics, "_load", lambda spec, task: loaded.append(spec))
    recipe = tiny_recipe(tiny_checkpoints["bert"], output_dir=str(tmp_path / "out"))
    recipe["task"] = {"type": "classification", "extra_metrics": ["finetune:classification", str(folder), "bleu"]}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count(OPT_IN) == 2 and "'bleu'" in text and "OK:" not in text
    # The opt-in passes it (with a warning that the scripts will run at `run`), still without loading them.
    assert main(["validate", str(path), "task.allow_metric_code=true"]) == 0
    out = capsys.readouterr()
    assert "task.allow_metric_code is on" in out.out + out.err
    assert not marker.exists() and loaded == []


def test_run_refuses_before_training(tiny_checkpoints, tmp_path, no_load):
    from finetune.config.recipe import Recipe
    from finetune.training import train

    folder, marker = _planted_module(tmp_path)
    recipe = tiny_recipe(tiny_checkpoints["bert"], output_dir=str(tmp_path / "out"))
    recipe["task"] = {"type": "classification", "extra_metrics": [str(folder)]}
    with pytest.raises(EvaluationError, match="allow_metric_code"):
        train.main(Recipe.model_validate(recipe))
    assert not marker.exists() and not (tmp_path / "out" / "best").exists()


def test_evaluate_refuses_before_loading_the_model(tmp_path, capsys):
    folder, marker = _planted_module(tmp_path)
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\nfine,positive\n")
    # The model does not exist: the metric's refusal comes first, so nothing was loaded to find that out.
    for spec in (str(folder), "accuracy"):
        assert main(["evaluate", str(tmp_path / "no-model"), str(data), "--metric", spec, "--no-log"]) == 2
        err = capsys.readouterr().err
        assert "--allow-metric-code" in err and "no-model" not in err, err
    assert not marker.exists()
