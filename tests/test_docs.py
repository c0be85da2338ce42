"""The documentation site (mkdocs.yml, docs/) builds strictly and offline, its generated reference covers every
command, flag and recipe field, the README stays short and points at it, and the getting-started page's commands
run for real."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, ROOT

BIN = Path(sys.executable).parent
DOCS = ROOT / "docs"
TESTED_BLOCK = re.compile(r"<!-- test: run -->\n```bash\n(.*?)```", re.S)


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with `mkdocs build --strict` into a temporary folder (nothing lands in the checkout)."""
    target = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(target)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return target


def test_the_site_builds_strictly_with_every_page_and_nothing_from_elsewhere(site):
    pages = ["index.html", "getting-started/index.html", "reference/recipe/index.html",
             "reference/commands/index.html", "reference/benchmarks/index.html", "guides/model-families/index.html"]
    for page in pages:
        assert (site / page).is_file(), page
    # Read offline: no web fonts, no script or style sheet from another site.
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, html
        assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', text), html


def test_strict_builds_fail_on_a_broken_link(tmp_path):
    """--strict with mkdocs.yml's validation settings refuses a link to a missing page or anchor: the check every
    relative link in docs/ passes in the test above."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[gone](nowhere.md) and [no anchor](#nothing-here)\n")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir=str(docs), nav=["index.md"], hooks=[], exclude_docs=None)
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    done = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=tmp_path, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "nowhere.md" in done.stderr and "nothing-here" in done.stderr


def test_the_reference_names_every_recipe_field_with_its_default_and_docstring():
    from pydantic import BaseModel

    from finetune.config.recipe import Recipe, _unwrap_optional, ordered_fields

    page = _hooks().recipe_reference()
    missing = []

    def walk(model, prefix):
        for name, field in ordered_fields(model).items():
            annotation = _unwrap_optional(field.annotation)
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            row = next((line for line in page.splitlines() if line.startswith(f"| `{prefix}{name}` |")), None)
            if row is None or (field.description or "")[:40].replace("<", "&lt;").replace("|", "\\|") not in row:
                missing.append(f"{prefix}{name}")

    walk(Recipe, "")
    assert missing == [], f"not in the recipe reference: {missing}"
    assert "| `training.seed` |" in page and "| `model.checkpoint` | str | required |" in page


def test_the_reference_names_every_command_and_flag():
    from finetune.cli import build_parser

    page = _hooks().command_reference()
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    missing = []
    for name, command in sub.choices.items():
        section = page.split(f"\n## finetune {name}\n", 1)
        if len(section) < 2:
            missing.append(name)
            continue
        section = section[1].split("\n## finetune ", 1)[0]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            for flag in action.option_strings or [action.metavar or action.dest]:
                if f"`{flag}`" not in section:
                    missing.append(f"{name} {flag}")
    assert missing == [], f"not in the command reference: {missing}"
    assert {"run", "serve", "evaluate", "label-issues", "fields", "clean"} <= set(sub.choices)


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert "mkdocs serve" in readme  # how to read the docs locally
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):  # every page is in the navigation and linked from the README
        relative = page.relative_to(DOCS).as_posix()
        assert relative in nav, relative
        if relative != "index.md":
            assert f"](docs/{relative})" in readme, relative


def test_the_getting_started_page_keeps_its_commands():
    blocks = TESTED_BLOCK.findall((DOCS / "getting-started.md").read_text(encoding="utf-8"))
    script = "".join(blocks)
    for command in ("finetune run recipes/quickstart.yaml", "finetune serve &", "/v1/predict", "finetune compare",
                    "finetune predict runs/quickstart/best"):
        assert command in script, command


@pytest.mark.e2e
def test_the_getting_started_commands_run(tiny_checkpoints, tmp_path):
    """The page's tested blocks, in order, as one bash script in an empty folder (the test's working folder, with its
    own MLflow store): `recipes/quickstart.yaml` is the shipped recipe with a tiny random BERT and 256 training
    sentences, and `finetune serve` gets `--port` with a free port in place of 8000 (the only change made to the commands)."""
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["checkpoint"] = str(tiny_checkpoints["bert"])
    recipe["data"]["files"] = {split: str(DATA / "sst2" / Path(path).name) for split, path in recipe["data"]["files"].items()}
    recipe["data"].update(max_train_samples=256, max_eval_samples=64)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "quickstart.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = "".join(TESTED_BLOCK.findall((DOCS / "getting-started.md").read_text(encoding="utf-8")))
    assert "finetune serve &" in script
    script = "set -euo pipefail\n" + script.replace("finetune serve &", "finetune serve --port 8000 &").replace(
        "8000", str(port))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        try:  # the script's own group: a server left behind by a failed step goes with it
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-4000:]
    assert "model: runs/quickstart/best" in out and "registered: sst2-sentiment version 1" in out, out[-4000:]
    assert '"model":"sst2-sentiment"' in out and '"predictions":[{"label":' in out, out[-4000:]
    assert re.search(r"^(positive|negative)\s+0\.\d+", out, re.M), out[-4000:]  # finetune predict's line
