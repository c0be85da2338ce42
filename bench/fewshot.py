"""Few-label benchmark (issue 36): training.method contrastive against SetFit 1.2 and our full fine-tuning.

At N examples per class (default 8, 16, 32, 64), several draws each (default 5: draw d uses seed d), on SST-2,
AG News and BBC News from ../shared/data, each method trains on exactly the same drawn examples (drawn once per
draw with finetune's own data.max_train_samples_per_class rule, `finetune.data.loading.sample_per_class`, and
written to a file all three read) and is scored on the set's published test split (SST-2: its dev set, GLUE's test
has no labels; AG News: the 7,600-row test set; BBC News: the 426-article test split of SOURCE.md). Methods:

  contrastive  `finetune run` with training.method: contrastive (SetFit's defaults: 20 iterations, batch 16, body
               learning rate 2e-5, cosine loss) and 8 label sentences per class ("This sentence is {}." with the
               class's name: training.contrastive.label_template; --label-template none: without), then the head
               alone on the frozen embeddings
  setfit       SetFit 1.2 (its own venv, bench/peers/setup_setfit.sh) with the same body, the same number of pair
               iterations and batch size, its logistic-regression head, its defaults otherwise (no label sentences);
               run as a subprocess (bench/peers/setfit_run.py)
  setfit-names (not run by default) SetFit 1.2 given the same label sentences, by its own get_templated_dataset
  standard     `finetune run`, full fine-tuning with the knob that served few labels best in bench/transfer.py and
               docs/guides/few-labels.md: the head alone first (training.head_only_steps), mean pooling

No method looks at the test split while training: the evaluation split of our runs is the drawn training set itself,
evaluated once at the end (so the best model is the last one). Figures: test accuracy mean ± sd over the draws, and
training time (ours: the pair phase plus the loop's training time; SetFit: its trainer.train()), both on this machine.

    python bench/fewshot.py                                        # everything (hours on 2 CPU cores)
    python bench/fewshot.py --sets sst2 --ns 8 --draws 1           # a smoke slice
    python bench/fewshot.py --methods contrastive standard         # without SetFit
    python bench/fewshot.py --methods contrastive setfit-names     # both given the label sentences
    python bench/fewshot.py --methods contrastive --sampling unique  # ours with SetFit 1.2's pair sampling
    python bench/fewshot.py --sets bbc --long-inputs chunk         # ours reading whole articles in windows
    python bench/fewshot.py --markdown results.md                  # also write the table for BENCHMARKS.md
    python bench/fewshot.py --workdir runs/fewshot --resume        # go on where an earlier attempt stopped

With --resume, each finished cell (set, N, draw, method) kept in the workdir's fewshot-cells.jsonl is reused, not run
again, when it was measured with the same settings (label sentences, loss, test rows); a cell interrupted half way
is measured again from its start (our runs here evaluate once, at the end, so they leave no checkpoint to resume).
The whole study takes longer than one sitting on 2 CPU cores, so it is built up over several.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import describe_machine  # noqa: E402
from recipe_runs import Runner, markdown, mean_sd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SETFIT_VENV = Path(os.environ.get("SETFIT_VENV", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                  / "finetune-bench" / "setfit-venv"))
METHODS = ("contrastive", "setfit", "setfit-names", "standard")
DEFAULT_METHODS = ("contrastive", "setfit", "standard")
LABEL_TEMPLATE, LABEL_EXAMPLES = "This sentence is {}.", 8
ITERATIONS, PAIR_BATCH = 20, 16
METHOD_SETTINGS = {"contrastive": {"pair_phase": "the run's training precision"}}
"""Settings of one method's cells beyond the shared ones: since 2026-12-07 our pair phase computes in the run's
training precision (bf16 autocast where the CPU computes bf16 and it is faster there), so the cells measured before,
with an fp32 pair phase, are measured again."""

SETS = {
    "sst2": {"name": "SST-2", "train": "sst2/train.tsv", "test": "sst2/dev.tsv", "text": "sentence", "label": "label",
             "names": ["negative", "positive"], "max_length": 64},
    "agnews": {"name": "AG News", "train": "ag_news/train_subset_5k_hf.csv", "test": "ag_news/test_hf.csv",
               "text": "text", "label": "label", "names": ["World", "Sports", "Business", "Sci/Tech"], "max_length": 128},
    "bbc": {"name": "BBC News", "train": "bbc_news/train.jsonl", "test": "bbc_news/test.jsonl", "text": "text",
            "label": "label", "names": ["business", "entertainment", "politics", "sport", "tech"], "max_length": 256},
}

# The loop after (contrastive) or instead of (standard) the pair phase. Both evaluate once, at the end, on the draw.
COMMON = ["training.eval_strategy=steps", "training.eval_steps=1000000", "training.warmup_ratio=0.0",
          "training.batch_size=16", "tracking.log_model=false", "tracking.system_metrics=false"]
HEAD = ["training.method=contrastive", f"training.contrastive.iterations={ITERATIONS}",
        f"training.contrastive.batch_size={PAIR_BATCH}", "training.freeze=encoder", "training.num_epochs=10",
        "training.learning_rate=1e-3"]
STANDARD = ["training.method=standard", "model.pooling=mean", "training.num_epochs=20", "training.learning_rate=1e-4",
            "training.head_only_steps=10"]


def read_rows(spec: dict, split: str) -> list[dict]:
    """The split as [{text, label name}], read as SOURCE.md says (SST-2: tab-separated, no quoting)."""
    path = SHARED / spec[split]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with open(path, encoding="utf-8", newline="") as f:
            if path.suffix == ".tsv":
                rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            else:
                rows = list(csv.DictReader(f))
    names = spec["names"]
    out = []
    for row in rows:
        label = row[spec["label"]]
        label = names[int(label)] if str(label).isdigit() else label
        out.append({"text": row[spec["text"]].strip(), "label": label})
    return out


def draw(rows: list[dict], names: list[str], n: int, seed: int) -> list[dict]:
    """N per class with finetune's own rule and seed (data.max_train_samples_per_class), as rows."""
    import datasets

    from finetune.data.loading import sample_per_class
    from finetune.tasks import get_task

    index = {name: i for i, name in enumerate(names)}
    ds = datasets.Dataset.from_dict({"row": list(range(len(rows))), "labels": [index[r["label"]] for r in rows]})
    return [rows[i] for i in sample_per_class(ds, n, seed, get_task("classification"), names)["row"]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def ours(runner: Runner, spec: dict, train: Path, test: Path, out: Path, seed: int, extra: list[str]) -> dict:
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(json.dumps({
        "name": out.name, "model": {"checkpoint": MODEL, "max_length": spec["max_length"]},
        "data": {"files": {"train": str(train), "validation": str(train), "test": str(test)},
                 "test_split": "test", "text_column": "text", "label_column": "label", "label_names": spec["names"]},
        "task": {"type": "classification", "metric_for_best": "accuracy"},
        "output_dir": str(out)}))  # JSON is YAML
    done = runner.finetune("run", str(recipe), f"training.seed={seed}", *COMMON, *extra)
    m = done.metrics
    return {"accuracy": m["test/accuracy"],
            "seconds": m.get("contrastive/seconds", 0.0) + m.get("train/runtime_seconds", 0.0)}


def setfit(spec: dict, train: Path, test: Path, seed: int, template: str | None = None) -> dict:
    from finetune.models.pretrained import resolve_checkpoint

    python = SETFIT_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no SetFit venv at {SETFIT_VENV}: run bench/peers/setup_setfit.sh first")
    command = [str(python), str(ROOT / "bench" / "peers" / "setfit_run.py"), "--model", str(resolve_checkpoint(MODEL).path),
               "--train", str(train), "--test", str(test), "--seed", str(seed), "--iterations", str(ITERATIONS),
               "--batch-size", str(PAIR_BATCH), "--max-length", str(spec["max_length"])]
    if template:
        command += ["--label-template", template, "--label-examples", str(LABEL_EXAMPLES), "--label-names", *spec["names"]]
    # In the draw's own folder: SetFit's trainer writes its checkpoints/ into the working directory.
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          cwd=train.parent)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"setfit failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Cells:
    """The cells (set, N, draw, method) measured in a workdir, one JSON line each, so that a study can be built up
    over several sittings; a cell counts only for the settings it was measured with."""

    def __init__(self, workdir: Path, settings: dict, reuse: bool, own: dict[str, dict] | None = None):
        self.path = workdir / "fewshot-cells.jsonl"
        self.settings = settings  # shared by every method; METHOD_SETTINGS and `own` add a method's own
        self.own = own or {}
        written = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        # An attempt killed while writing its last cell left a torn line: the next cell starts a line of its own.
        if written and not written.endswith("\n"):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n")
        self.done = {}
        for line in filter(None, written.splitlines() if reuse else []):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # that torn line: its cell is measured again
                continue
            if entry["settings"] == self._settings(entry["method"]):
                self.done[(entry["set"], entry["n"], entry["draw"], entry["method"])] = entry["result"]

    def _settings(self, method: str) -> dict:
        return {**self.settings, **METHOD_SETTINGS.get(method, {}), **self.own.get(method, {})}

    def get(self, key: tuple[str, int, int, str]) -> dict | None:
        return self.done.get(key)

    def add(self, key: tuple[str, int, int, str], result: dict) -> None:
        self.done[key] = result
        entry = dict(zip(("set", "n", "draw", "method"), key), settings=self._settings(key[3]), result=result,
                     time=time.time())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--ns", nargs="+", type=int, default=[8, 16, 32, 64], help="examples per class")
    parser.add_argument("--draws", type=int, default=5, help="draws per N (draw d uses seed d)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                        help="setfit-names: SetFit given the same label sentences as ours (its get_templated_dataset)")
    parser.add_argument("--label-template", default=LABEL_TEMPLATE,
                        help="training.contrastive.label_template of the contrastive method, and setfit-names' template "
                             f"({LABEL_EXAMPLES} sentences per class); 'none': without (default {LABEL_TEMPLATE!r})")
    parser.add_argument("--loss", choices=["cosine", "cosent"], default="cosine",
                        help="training.contrastive.loss of the contrastive method")
    parser.add_argument("--sampling", choices=["random", "unique"], default="random",
                        help="training.contrastive.sampling of the contrastive method (unique: SetFit 1.2's pairs)")
    parser.add_argument("--long-inputs", choices=["truncate", "chunk"], default="truncate",
                        help="task.long_inputs of the contrastive method (chunk: the head trains on, and predicts "
                             "from, every window of a long text)")
    parser.add_argument("--max-test", type=int, default=None, help="score on the first N test rows only (smoke runs)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs and the MLflow store go (default: temp)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the markdown table to this file")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the cells an earlier attempt in --workdir finished with the same settings")
    args = parser.parse_args(argv)
    # Absolute: SetFit runs as a subprocess from inside the work folder, where a relative path would name nothing.
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="fewshot-"))).resolve()
    runner = Runner(workdir)
    template = None if args.label_template.lower() == "none" else args.label_template
    if "setfit-names" in args.methods and template is None:
        parser.error("setfit-names needs a --label-template")
    named = [f"training.contrastive.label_template={template}",
             f"training.contrastive.label_examples={LABEL_EXAMPLES}"] if template else []
    results: dict[tuple[str, int, str], list[dict]] = {}
    cells = Cells(workdir, {"label_template": template, "label_examples": LABEL_EXAMPLES if template else 0,
                            "loss": args.loss, "max_test": args.max_test, "iterations": ITERATIONS,
                            "pair_batch": PAIR_BATCH}, reuse=args.resume,
                  # only when not the default, so that the cells measured before the choice existed still count
                  own={"contrastive": {k: getattr(args, k) for k in ("sampling", "long_inputs")
                                       if getattr(args, k) != parser.get_default(k)}})
    contrastive = [*HEAD, f"training.contrastive.loss={args.loss}", f"training.contrastive.sampling={args.sampling}",
                   f"task.long_inputs={args.long_inputs}", *named]
    started = time.perf_counter()
    for key in args.sets:
        spec = SETS[key]
        train_rows = read_rows(spec, "train")
        test_rows = read_rows(spec, "test")[:args.max_test]
        test = write_jsonl(workdir / f"{key}-test.jsonl", test_rows)
        # chunk: a quarter of a window shared (64 tokens for BBC's 256, the default)
        stride = [f"task.chunk_stride={spec['max_length'] // 4}"] if args.long_inputs == "chunk" else []
        for n in args.ns:
            for d in range(args.draws):
                train = write_jsonl(workdir / f"{key}-n{n}-d{d}.jsonl", draw(train_rows, spec["names"], n, d))
                for method in args.methods:
                    got = cells.get((key, n, d, method))
                    earlier = got is not None
                    if not earlier:
                        if method.startswith("setfit"):
                            got = setfit(spec, train, test, d, template if method == "setfit-names" else None)
                        else:
                            got = ours(runner, spec, train, test, workdir / f"{key}-n{n}-d{d}-{method}", d,
                                       [*contrastive, *stride] if method == "contrastive" else STANDARD)
                        cells.add((key, n, d, method), got)
                    results.setdefault((key, n, method), []).append(got)
                    print(f"{spec['name']} N={n} draw {d} {method}: accuracy {got['accuracy']:.4f}, "
                          f"{got['seconds']:.1f} s{' (measured earlier)' if earlier else ''}", flush=True)
    header = ["set", "N per class", *[f"{m} accuracy" for m in args.methods], *[f"{m} s" for m in args.methods]]
    rows = []
    for key in args.sets:
        for n in args.ns:
            got = [results[(key, n, m)] for m in args.methods]
            rows.append([SETS[key]["name"], str(n), *[mean_sd([r["accuracy"] for r in g]) for g in got],
                         *[f"{statistics.mean(r['seconds'] for r in g):.0f}" for g in got]])
    table = markdown(header, rows)
    info = describe_machine(("torch", "transformers", "sentence-transformers"))
    text = (f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']} ({info['threads']} threads), "
            f"transformers {info['transformers']}, sentence-transformers {info['sentence-transformers']}\n"
            f"command: python {shlex.join(['bench/fewshot.py', *(argv if argv is not None else sys.argv[1:])])}\n"
            f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {args.draws} draw(s) per N; "
            f"{time.perf_counter() - started:.0f} s in all; label sentences: "
            f"{f'{template!r} x {LABEL_EXAMPLES} per class' if template else 'none'}\n\n{table}\n")
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
