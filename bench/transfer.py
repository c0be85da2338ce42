"""Transfer-learning benchmark: what each knob of issue 17 buys, side by side, on the offline MiniLM.

Every run is `finetune run` on an offline recipe with overrides, in its own process (so peak memory is the run's
own), logging to a temporary MLflow store that the figures are read back from. Sections:

  knobs        SST-2 (../shared/data/sst2) at two training sizes (seeded subsets, default 500 and 6,000 sentences),
               the full 872-sentence dev set, several training seeds: full fine-tuning; frozen embeddings; frozen
               encoder (linear probe, encoder outputs cached); layer-wise LR decay; LoRA r=8. Dev accuracy
               (mean +- sd over seeds), trainable parameters, training samples/s, peak memory, saved model size.
  transfer     intermediate-task transfer: RTE trained from the pretrained MiniLM, and RTE started from an MRPC
               model (trained once here; its head is replaced, the encoder kept), same RTE recipe otherwise.
  imbalance    GoEmotions (28 labels, multi-label; a seeded train subset) without and with task.class_weights:
               balanced, and with task.loss: focal; macro- and micro-F1 on the dev set.
  calibration  expected calibration error before and after temperature scaling: SST-2 (the knobs section's full
               fine-tuning runs) and AG News (4 classes).
  pooling      model.pooling first against mean, with full fine-tuning and with a linear probe, on SST-2 at the knobs
               section's sizes (the MiniLM was trained by sentence-transformers for mean pooling).

    python bench/transfer.py                                  # everything, 3 seeds (hours on 2 CPU cores)
    python bench/transfer.py --sections knobs --seeds 5
    python bench/transfer.py --sections imbalance --seeds 2 --first-seed 2   # seeds 2 and 3
    python bench/transfer.py --sections pooling --sizes 6000  # model.pooling first vs mean, 3 seeds
    python bench/transfer.py --quick                          # smoke run on the shipped samples (the tests run this)

The results print as markdown tables to paste into BENCHMARKS.md, after the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import describe_machine
from recipe_runs import mean_sd

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("knobs", "transfer", "imbalance", "calibration", "pooling")
CALIBRATION_DATA = ("sst2", "agnews")
KNOBS = {
    "full": ("full fine-tuning", []),
    "frozen-embeddings": ("frozen embeddings", ["training.freeze=embeddings"]),
    "linear-probe": ("frozen encoder (linear probe)", ["training.freeze=encoder", "training.learning_rate=5e-3"]),
    "llrd": ("layer-wise LR decay 0.8", ["training.layer_lr_decay=0.8", "training.learning_rate=2e-4"]),
    "lora-r8": ("LoRA r=8 (query, value)", ["model.adapter.r=8", "model.adapter.alpha=16", "training.learning_rate=1e-3"]),
}
# What the head reads (model.pooling), for the two ways that differ most in how much of the encoder trains.
POOLING = {"full": KNOBS["full"], "linear-probe": KNOBS["linear-probe"]}
POOLINGS = {"first": "first token ([CLS], through BERT's pooler)", "mean": "mean over tokens (then the pooler)"}
IMBALANCE = {
    "plain": ("binary cross-entropy", []),
    "balanced": ("class_weights: balanced (pos_weight)", ["task.class_weights=balanced"]),
    "focal": ("loss: focal, gamma 2", ["task.loss=focal"]),
}


def shared_data() -> Path:
    """The ../shared/data copies beside the checkout."""
    return ROOT.parent / "shared" / "data"


def write_subset(source: Path, target: Path, size: int | None, seed: int) -> Path:
    """A seeded random subset of a TSV with a header (all rows when size is None or larger)."""
    with open(source, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    header, rows = lines[0], [line for line in lines[1:] if line.strip()]
    if size is not None and size < len(rows):
        rows = random.Random(seed).sample(rows, size)
    target.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return target


class Runner:
    """Runs recipes (in a fresh process each, or in this one for --quick) and reads their figures back from MLflow."""

    def __init__(self, workdir: Path, in_process: bool, base_overrides: list[str], journal: Path | None = None):
        self.workdir, self.in_process, self.base = workdir, in_process, base_overrides
        self.uri = f"sqlite:///{workdir / 'mlflow.db'}"
        self.count = 0
        # The full run takes hours: each run's figures are appended here as it finishes, so a crash or a kill
        # near the end loses only the run in flight, not the tables (which print at the end).
        self.journal = journal

    def run(self, recipe: Path, overrides: list[str]) -> dict:
        """Train once; returns the run's metrics, its id and the best model folder."""
        self.count += 1
        out = self.workdir / f"run-{self.count}"
        args = [*self.base, *overrides, f"output_dir={out}", f"tracking.experiment=bench-{self.count}",
                "tracking.log_model=false", "tracking.system_metrics=false"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri, "FINETUNE_CACHE_DIR": str(self.workdir / "cache")}
        started = time.perf_counter()
        if self.in_process:
            os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "FINETUNE_CACHE_DIR")})
            from finetune.config.recipe import load_recipe
            from finetune.training import train

            run_id = train.main(load_recipe(recipe, args)).run_id
        else:
            done = subprocess.run([sys.executable, "-m", "finetune", "run", str(recipe), *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"finetune run {recipe} {shlex.join(args)} failed:\n{done.stderr[-3000:]}")
            run_id = re.search(r"MLflow: experiment \S+, run ([0-9a-f]{32})", done.stdout).group(1)
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
        result = {"run_id": run_id, "metrics": metrics, "best_dir": str(out / "best"), "overrides": overrides,
                  "wall_seconds": time.perf_counter() - started}
        best = {k: round(v, 4) for k, v in metrics.items() if k.startswith("best/")}
        print(f"run {self.count}: {recipe.name} {shlex.join(overrides)}: {best}, {result['wall_seconds']:.0f} s",
              file=sys.stderr, flush=True)
        if self.journal is not None:
            with open(self.journal, "a", encoding="utf-8") as f:
                f.write(json.dumps({"recipe": recipe.name, **result}) + "\n")
        return result


def _mean(runs: list[dict], key: str) -> float:
    values = [r["metrics"].get(key) for r in runs if r["metrics"].get(key) is not None]
    return statistics.mean(values) if values else float("nan")


def knobs_section(runner: Runner, recipe: Path, train_file: Path, sizes: list[int], seeds: list[int],
                  workdir: Path, extra: list[str], ways: list[str]) -> tuple[list[str], dict]:
    lines, results = [], {}
    for size in sizes:
        subset = write_subset(train_file, workdir / f"sst2-train-{size}.tsv", size, seed=42)
        lines += [f"SST-2, {size} training sentences (seeded subset, seed 42), full dev set, seeds {seeds}:", "",
                  "| way | dev accuracy | trainable parameters | samples/s | vs full | peak memory MB | saved MB | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        full_speed = None
        for way, (what, overrides) in KNOBS.items():
            if way not in ways:
                continue
            runs = [runner.run(recipe, [f"data.files.train={subset}", f"training.seed={s}", *extra, *overrides])
                    for s in seeds]
            results[f"{size}/{way}"] = runs
            accuracy = [r["metrics"]["best/accuracy"] for r in runs]
            speed = _mean(runs, "train/samples_per_second_overall")
            full_speed = speed if way == "full" else full_speed
            vs_full = f"{speed / full_speed:.2f}x" if full_speed else "n/a"
            lines.append(f"| {what} | {mean_sd(accuracy)} | {int(_mean(runs, 'model/trainable_parameters')):,} | "
                         f"{speed:.1f} | {vs_full} | {_mean(runs, 'train/peak_memory_mb'):.0f} | "
                         f"{_mean(runs, 'model/saved_weights_mb'):.2f} | {_mean(runs, 'train/runtime_seconds'):.1f} |")
        lines.append("")
    return lines, results


def pooling_section(runner: Runner, recipe: Path, train_file: Path, sizes: list[int], seeds: list[int],
                    workdir: Path, extra: list[str]) -> tuple[list[str], dict]:
    lines, results = [], {}
    for size in sizes:
        subset = write_subset(train_file, workdir / f"sst2-train-{size}.tsv", size, seed=42)
        lines += [f"Pooling: SST-2, {size} training sentences (seeded subset, seed 42), full dev set, seeds {seeds}:", "",
                  "| way | pooling | dev accuracy | train s |", "|---|---|---|---|"]
        for way, (what, overrides) in POOLING.items():
            for pooling, said in POOLINGS.items():
                runs = [runner.run(recipe, [f"data.files.train={subset}", f"training.seed={s}", *extra, *overrides,
                                            f"model.pooling={pooling}"]) for s in seeds]
                results[f"{size}/{way}/{pooling}"] = runs
                lines.append(f"| {what} | {said} | {mean_sd([r['metrics']['best/accuracy'] for r in runs])} | "
                             f"{_mean(runs, 'train/runtime_seconds'):.1f} |")
        lines.append("")
    return lines, results


def transfer_section(runner: Runner, source_recipe: Path, target_recipe: Path, seeds: list[int],
                     source_extra: list[str], target_extra: list[str]) -> tuple[list[str], dict]:
    parent = runner.run(source_recipe, [*source_extra])
    scratch = [runner.run(target_recipe, [f"training.seed={s}", *target_extra]) for s in seeds]
    started = [runner.run(target_recipe, [f"training.seed={s}", f"model.checkpoint={parent['best_dir']}", *target_extra])
               for s in seeds]
    metric = "best/accuracy"
    lines = [f"Intermediate-task transfer: {target_recipe.name} from the pretrained checkpoint against {target_recipe.name} "
             f"started from a {source_recipe.name} model (dev {metric.split('/')[1]} {parent['metrics'][metric]:.4f}; its "
             f"encoder kept, its head replaced), same recipe otherwise, seeds {seeds}:", "",
             "| start | dev accuracy | train s |", "|---|---|---|",
             f"| pretrained | {mean_sd([r['metrics'][metric] for r in scratch])} | {_mean(scratch, 'train/runtime_seconds'):.1f} |",
             f"| {source_recipe.stem} model | {mean_sd([r['metrics'][metric] for r in started])} | "
             f"{_mean(started, 'train/runtime_seconds'):.1f} |", ""]
    return lines, {"parent": parent, "scratch": scratch, "from_parent": started}


def imbalance_section(runner: Runner, recipe: Path, seeds: list[int], extra: list[str]) -> tuple[list[str], dict]:
    lines = [f"Imbalance: {recipe.name} ({', '.join(extra) or 'as shipped'}), seeds {seeds}:", "",
             "| loss | macro-F1 | micro-F1 | temperature |", "|---|---|---|---|"]
    results = {}
    for name, (what, overrides) in IMBALANCE.items():
        runs = [runner.run(recipe, [f"training.seed={s}", *extra, *overrides]) for s in seeds]
        results[name] = runs
        # Calibration moves the threshold with the scores, so the served labels are the ones scored here.
        temperatures = [r["metrics"]["calibration/temperature"] for r in runs if "calibration/temperature" in r["metrics"]]
        lines.append(f"| {what} | {mean_sd([r['metrics']['best/f1_macro'] for r in runs])} | "
                     f"{mean_sd([r['metrics']['best/f1_micro'] for r in runs])} | {mean_sd(temperatures)} |")
    return lines + [""], results


def calibration_lines(named_runs: dict[str, list[dict]]) -> list[str]:
    lines = ["Calibration (temperature scaling fitted on the dev set it is measured on; 15-bin ECE):", "",
             "| data | ECE before | ECE after | NLL before | NLL after | temperature |", "|---|---|---|---|---|---|"]
    for name, runs in named_runs.items():
        get = lambda key: [r["metrics"][key] for r in runs if key in r["metrics"]]  # noqa: E731
        lines.append(f"| {name} | {mean_sd(get('calibration/ece_before'))} | {mean_sd(get('calibration/ece_after'))} | "
                     f"{mean_sd(get('calibration/nll_before'))} | {mean_sd(get('calibration/nll_after'))} | "
                     f"{mean_sd(get('calibration/temperature'))} |")
    return lines + [""]


def tiny_checkpoint(target: Path) -> Path:
    """A random 2-layer BERT with a vocabulary from the shipped samples, for --quick (seconds per run)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModel, BertConfig, BertTokenizerFast

    from tests.tiny_models import _vocab

    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(_vocab())}, do_lower_case=True)
    torch.manual_seed(0)
    model = AutoModel.from_config(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=512))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def quick_recipes(workdir: Path) -> dict[str, Path]:
    """Recipes on the shipped samples (data/, tests/data/) shaped like the offline ones."""
    import yaml

    tests = ROOT / "tests" / "data"
    goemotions = ("admiration amusement anger annoyance approval caring confusion curiosity desire disappointment "
                  "disapproval disgust embarrassment excitement fear gratitude grief joy love nervousness optimism pride "
                  "realization relief remorse sadness surprise neutral").split()
    common = {"training": {"num_epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "eval_strategy": "epoch"}}
    sst2 = {"files": {"train": str(ROOT / "data/sst2/train.tsv"), "validation": str(ROOT / "data/sst2/dev.tsv")},
            "quoting": "none", "text_column": "sentence", "label_names": ["negative", "positive"], "max_eval_samples": 64}
    recipes = {
        "sst2": {"data": sst2, "task": {"type": "classification"}},
        "sst2-128": {"data": {**sst2, "max_train_samples": 128}, "task": {"type": "classification"}},
        "mrpc": {"data": {"files": {"train": str(tests / "mrpc_sample.tsv")}, "quoting": "none", "text_column": "sentence1",
                          "text_pair_column": "sentence2", "validation_size": 0.25}, "task": {"type": "classification"}},
        "pairs": {"data": {"files": {"train": str(tests / "mrpc_sample.tsv")}, "quoting": "none", "text_column": "sentence1",
                           "text_pair_column": "sentence2", "label_names": ["different", "same"], "validation_size": 0.25},
                  "task": {"type": "classification"}},
        "goemotions": {"data": {"files": {"train": str(tests / "goemotions_sample.tsv")}, "quoting": "none",
                                "label_column": "labels", "label_names": goemotions, "validation_size": 0.25},
                       "task": {"type": "multi_label", "threshold": 0.3}},
    }
    paths = {}
    for name, body in recipes.items():
        recipe = {"name": f"quick-{name}", "model": {"checkpoint": str(workdir / "tiny"), "max_length": 64}, **common, **body}
        paths[name] = workdir / f"quick-{name}.yaml"
        paths[name].write_text(yaml.safe_dump(recipe, sort_keys=False))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"which to run (default {','.join(SECTIONS)})")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per configuration (default 3)")
    parser.add_argument("--first-seed", type=int, default=1,
                        help="seeds are first-seed, first-seed + 1, ... (default 1; e.g. 2 adds seeds to an earlier run)")
    parser.add_argument("--sizes", default="500,6000", help="SST-2 training sizes of the knobs section (default 500,6000)")
    parser.add_argument("--epochs", type=float, default=3, help="epochs of the knobs section (default 3)")
    parser.add_argument("--ways", default=",".join(KNOBS),
                        help=f"ways of the knobs section (default {','.join(KNOBS)}; 'vs full' needs full)")
    parser.add_argument("--goemotions-train", type=int, default=8000,
                        help="seeded GoEmotions training subset of the imbalance section (default 8000)")
    parser.add_argument("--calibration-data", default="sst2,agnews",
                        help="data sets of the calibration section (default sst2,agnews; sst2 reuses the knobs "
                             "section's full fine-tuning runs when they ran)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny random model on the shipped samples")
    parser.add_argument("--json", help="also write every run's figures to this JSON file (and, as each run ends, "
                                       "one line per run to the same path with .jsonl appended)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    ways = [w for w in args.ways.split(",") if w]
    calibration_data = [d for d in args.calibration_data.split(",") if d]
    for what, asked, allowed in (("section", sections, SECTIONS), ("way", ways, tuple(KNOBS)),
                                 ("calibration data set", calibration_data, CALIBRATION_DATA)):
        unknown = sorted(set(asked) - set(allowed))
        if unknown:
            parser.error(f"unknown {what}(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    seeds = list(range(args.first_seed, args.first_seed + (2 if args.quick else args.seeds)))
    # --quick: two seeds where a spread is shown (the knobs), one elsewhere, to stay a smoke run.
    other_seeds = seeds[:1] if args.quick else seeds
    data = shared_data()
    out: list[str] = []
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        workdir = Path(tmp)
        if args.quick:
            tiny_checkpoint(workdir / "tiny")
            quick = quick_recipes(workdir)
            sizes = [64]
            recipes = {"sst2": quick["sst2"], "source": quick["mrpc"], "target": quick["pairs"],
                       "goemotions": quick["goemotions"], "multiclass": quick["sst2-128"]}
            knob_extra, source_extra, target_extra, imbalance_extra, multi_extra = [], [], [], [], []
            train_file = ROOT / "data" / "sst2" / "train.tsv"
        else:
            missing = [p for p in ("sst2/train.tsv", "rte/train.tsv", "mrpc/train.tsv", "goemotions/train.tsv",
                                   "ag_news/train_subset_5k_hf.csv") if not (data / p).is_file()]
            if missing:
                parser.error(f"needs ../shared/data (missing: {', '.join(missing)}); --quick runs on the shipped samples")
            sizes = [int(s) for s in args.sizes.split(",")]
            offline = ROOT / "recipes" / "offline"
            recipes = {"sst2": offline / "sst2-minilm.yaml", "source": offline / "mrpc-minilm.yaml",
                       "target": offline / "rte-minilm.yaml", "goemotions": offline / "goemotions-minilm.yaml",
                       "multiclass": offline / "agnews-minilm.yaml"}
            knob_extra = [f"training.num_epochs={args.epochs:g}", "training.eval_strategy=epoch"]
            source_extra, target_extra, multi_extra = [], [], ["data.test_split=null"]
            imbalance_extra = [f"data.max_train_samples={args.goemotions_train}", "data.test_split=null"]
            train_file = data / "sst2" / "train.tsv"
        runner = Runner(workdir, in_process=args.quick, base_overrides=[],
                        journal=Path(args.json + ".jsonl") if args.json else None)
        started = time.time()
        if "knobs" in sections or "calibration" in sections:
            lines, results["knobs"] = knobs_section(runner, recipes["sst2"], train_file, sizes, seeds, workdir, knob_extra,
                                                     ways) \
                if "knobs" in sections else ([], {})
            out += lines
        if "pooling" in sections:
            lines, results["pooling"] = pooling_section(runner, recipes["sst2"], train_file, sizes, other_seeds,
                                                        workdir, knob_extra)
            out += lines
        if "transfer" in sections:
            lines, results["transfer"] = transfer_section(runner, recipes["source"], recipes["target"], other_seeds,
                                                          source_extra, target_extra)
            out += lines
        if "imbalance" in sections:
            lines, results["imbalance"] = imbalance_section(runner, recipes["goemotions"], other_seeds, imbalance_extra)
            out += lines
        if "calibration" in sections:
            named = {}
            if "sst2" in calibration_data:
                full = results.get("knobs", {}).get(f"{max(sizes)}/full", [])
                if not full:  # calibration alone: the SST-2 full fine-tuning runs at the largest size
                    subset = write_subset(train_file, workdir / "sst2-calibration.tsv", max(sizes), seed=42)
                    full = [runner.run(recipes["sst2"], [f"data.files.train={subset}", f"training.seed={s}", *knob_extra])
                            for s in seeds]
                named["SST-2 (2 classes)"] = full
            if "agnews" in calibration_data:
                named["AG News (4 classes)" if not args.quick else "SST-2 sample (quick)"] = [
                    runner.run(recipes["multiclass"], [f"training.seed={s}", *multi_extra]) for s in other_seeds]
            results["calibration"] = named
            out += calibration_lines(named)
        minutes = (time.time() - started) / 60

    info = describe_machine(("torch", "transformers", "peft", "accelerate"))
    print(f"machine: {info['cpu']}, {info['cores']} cores{', GPU ' + info['gpu'] if info['gpu'] else ''}; torch "
          f"{info['torch']} ({info['threads']} threads), transformers {info['transformers']}, peft {info['peft']}, "
          f"python {info['python']}")
    print(f"command: python {shlex.join(['bench/transfer.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {runner.count} runs in {minutes:.1f} min"
          + ("; --quick: a tiny random model, runs in this process (peak memory is the process's)" if args.quick else
             "; each run in its own process"))
    print()
    print("\n".join(out))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "results": results}, indent=2,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
