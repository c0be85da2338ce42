"""Training benchmark: `finetune` against the Hugging Face Trainer, same checkpoint, data, hyperparameters and steps.

Ways to fine-tune the same checkpoint on the same seeded SST-2 subset, each in a fresh process, one after
the other on the same machine:

  (a) the Trainer as `run_glue.py` runs it by default: every example padded to max_length (128);
  (b) the Trainer with dynamic padding (`DataCollatorWithPadding`);
  (c) `finetune run`, with its defaults (length-grouped batches, fused AdamW, bf16 where the CPU has it, ...);
  (d) on a CPU that computes bf16 natively, where finetune's `auto` precision trains in bf16: (b) with
      `--bf16` too, so the table shows how much of (c)'s lead is precision and how much the rest.

Each reports training samples/s, real (non-pad) tokens/s, MFU and the dev accuracy after training. MFU is
model FLOPs per second over the machine's fp32 matrix-multiply peak, measured here with `torch.mm`; the
model FLOPs count only real tokens, per example of L tokens:

    6 * N * L + 12 * n_layers * d_model * L^2

N = parameters outside the embeddings (6N: forward and backward of every weight matrix per token), the
second term: Q.K^T and attention.V (2 * L^2 * d each forward, x3 with the backward) in every layer.
Padding is work the model does but not model FLOPs, so padding lowers MFU.

    python bench/train.py                       # (a), (b), (c) on 4,096 sentences, one epoch, batch 32
    python bench/train.py --quick               # smoke run, every way in this one process (the test suite runs this)
    python bench/train.py --ways b,c --repeats 5   # means over five training seeds
    python bench/train.py --ways b,c --repeats 10 --first-training-seed 47   # ten more seeds, same data
    python bench/train.py --ways b,c --finetune training.group_by_length=false
    python bench/train.py --time-to-accuracy    # (b) and (c) on all of SST-2 until dev accuracy 0.88

It runs unchanged on a GPU: every way then trains in bf16 (or fp16) autocast, the Trainer as
`--bf16`/`--fp16` would and finetune through `training.mixed_precision: auto`, and (d) is not needed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from machine_info import describe_machine

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "sentence-transformers/all-MiniLM-L6-v2"
# Wall time to this many optimizer steps (evaluations included) shows the first minute: a CPU sets its kernels up
# once per batch shape, so a run can train slowly at first (issue 20).
FIRST_STEPS = 100
WAYS = {
    "a": "Trainer, padding to max_length (run_glue.py default)",
    "b": "Trainer, dynamic padding (DataCollatorWithPadding)",
    "c": "finetune",
    "d": "Trainer, dynamic padding, bf16 autocast (--bf16)",
}


@dataclass
class Spec:
    """Everything the ways share; written to JSON for the worker processes."""

    checkpoint: str
    train_file: str
    dev_file: str
    max_length: int = 128
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    epochs: float = 1.0
    seed: int = 42
    logging_steps: int = 50
    eval_steps: int | None = None  # time to accuracy: evaluate every N steps ...
    target: float | None = None  # ... and stop once dev accuracy reaches this
    finetune_overrides: list[str] = field(default_factory=list)
    workdir: str = ""


# ---------------------------------------------------------------------------------------------
# data and figures
# ---------------------------------------------------------------------------------------------


def sst2_dir() -> Path:
    """The full SST-2 copy in ../shared/data when present, else the sample shipped in data/."""
    shared = ROOT.parent / "shared" / "data" / "sst2"
    return shared if (shared / "train.tsv").exists() else ROOT / "data" / "sst2"


def read_tsv(path: Path | str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_subset(source: Path, target: Path, size: int | None, seed: int) -> Path:
    """A seeded random subset of a TSV (all rows when size is None), written as a TSV every way reads."""
    rows = read_tsv(source)
    if size is not None and size < len(rows):
        rows = random.Random(seed).sample(rows, size)
    with open(target, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence", "label"], delimiter="\t", quoting=csv.QUOTE_NONE,
                                escapechar=None, lineterminator="\n")
        writer.writeheader()
        writer.writerows({"sentence": r["sentence"], "label": r["label"]} for r in rows)
    return target


def peak_matmul_flops(n: int = 2048, repeats: int = 10, trials: int = 5) -> float:
    """The machine's fp32 matrix-multiply peak as torch reaches it: the best of a few timed `torch.mm` runs."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(trials):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best


def model_shape(path: Path) -> dict[str, int]:
    """Parameters outside the embeddings, layers and hidden size of the checkpoint with a 2-class head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if ".embeddings." not in name)
    return {"non_embedding_params": non_embedding, "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def token_lengths(path: Path, texts: list[str], max_length: int) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


def model_flops(lengths: list[int], shape: dict[str, int]) -> float:
    """Training FLOPs of one pass over examples of these real lengths (formula in the module docstring)."""
    n, layers, d = shape["non_embedding_params"], shape["layers"], shape["hidden"]
    return float(sum(6 * n * length + 12 * layers * d * length * length for length in lengths))


# ---------------------------------------------------------------------------------------------
# the ways (each runs in its own process: `--worker WAY`)
# ---------------------------------------------------------------------------------------------


def resolve(checkpoint: str) -> Path:
    from finetune.models.pretrained import resolve_checkpoint

    return resolve_checkpoint(checkpoint).path


def accuracy(logits, labels) -> float:
    import numpy as np

    return float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())


def run_trainer(spec: Spec, pad_to_max: bool, cpu_bf16: bool = False) -> dict:
    """(a), (b) or (d): the Trainer as a user would write it, following run_glue.py."""
    import datasets
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments, default_data_collator, set_seed)

    path = resolve(spec.checkpoint)
    set_seed(spec.seed)  # before the model, as run_glue.py does, so the new head starts the same way
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})

    def load(file: str) -> datasets.Dataset:
        rows = read_tsv(file)
        ds = datasets.Dataset.from_dict({"sentence": [r["sentence"] for r in rows], "label": [int(r["label"]) for r in rows]})
        return ds.map(lambda b: tokenizer(b["sentence"], padding="max_length" if pad_to_max else False,
                                          truncation=True, max_length=spec.max_length),
                      batched=True, remove_columns=["sentence"])

    train, dev = load(spec.train_file), load(spec.dev_file)
    steps = math.ceil(spec.epochs * math.ceil(len(train) / spec.batch_size))
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(Path(spec.workdir) / "trainer"), per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=64, learning_rate=spec.learning_rate, weight_decay=spec.weight_decay,
        num_train_epochs=spec.epochs, lr_scheduler_type="linear", warmup_steps=math.ceil(spec.warmup_ratio * steps),
        max_grad_norm=1.0, seed=spec.seed, logging_steps=spec.logging_steps, save_strategy="no",
        eval_strategy="steps" if spec.eval_steps else "no", eval_steps=spec.eval_steps, report_to="none",
        disable_tqdm=True, use_cpu=not cuda, bf16=bf16 or cpu_bf16, fp16=cuda and not bf16,
    )
    clock: dict = {"evals": [], "eval_seconds": 0.0}

    class TimeToAccuracy(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == FIRST_STEPS:
                clock["first_steps"] = time.perf_counter() - clock["start"]

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            clock["eval_seconds"] += metrics.get("eval_runtime", 0.0)
            clock["evals"].append((state.global_step, metrics["eval_accuracy"], time.perf_counter() - clock["start"]))
            if spec.target is not None and metrics["eval_accuracy"] >= spec.target and "reached" not in clock:
                clock["reached"] = clock["evals"][-1]
                control.should_training_stop = True

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=default_data_collator if pad_to_max else DataCollatorWithPadding(tokenizer),
                      compute_metrics=lambda p: {"accuracy": accuracy(p.predictions, p.label_ids)},
                      callbacks=[TimeToAccuracy()])
    output = trainer.train()
    wall = time.perf_counter() - clock["start"]
    predictions = trainer.predict(dev)
    return {"train_seconds": output.metrics["train_runtime"] - clock["eval_seconds"], "wall_seconds": wall,
            "steps": output.global_step, "dev_accuracy": accuracy(predictions.predictions, predictions.label_ids),
            "evals": clock["evals"], "reached": clock.get("reached"), "first_steps_seconds": clock.get("first_steps")}


def run_finetune(spec: Spec) -> dict:
    """(c): `finetune run` on a recipe with the same settings, plus any --finetune overrides."""
    import yaml

    from finetune.training import train
    from finetune.config.recipe import load_recipe
    from finetune.training.speed import precision

    work = Path(spec.workdir)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("FINETUNE_CACHE_DIR", str(work / "cache"))
    recipe = {
        "name": "bench-train",
        "model": {"checkpoint": spec.checkpoint, "max_length": spec.max_length},
        "data": {"files": {"train": spec.train_file, "validation": spec.dev_file}, "quoting": "none",
                 "text_column": "sentence", "label_column": "label", "label_names": ["negative", "positive"]},
        "task": {"type": "classification", "metric_for_best": "accuracy"},
        "training": {"num_epochs": spec.epochs, "batch_size": spec.batch_size, "eval_batch_size": 64,
                     "learning_rate": spec.learning_rate, "weight_decay": spec.weight_decay,
                     "warmup_ratio": spec.warmup_ratio, "seed": spec.seed, "logging_steps": spec.logging_steps,
                     "max_grad_norm": 1.0, "scheduler": "linear", "save_total_limit": 1}
                    | ({"eval_strategy": "steps", "eval_steps": spec.eval_steps} if spec.eval_steps else {}),
        "tracking": {"log_model": False, "system_metrics": False},
        "output_dir": str(work / "finetune"),
    }
    path = work / "bench-train.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    loaded = load_recipe(path, spec.finetune_overrides)
    clock: dict = {"evals": []}

    def start_clock() -> None:  # just before the first batch, as the Trainer's on_train_begin does for (a)/(b)
        clock.setdefault("start", time.perf_counter())

    def on_evaluate(step: int, metrics: dict[str, float]) -> bool:
        clock["evals"].append((step, metrics["accuracy"], time.perf_counter() - clock["start"]))
        if spec.target is not None and metrics["accuracy"] >= spec.target and "reached" not in clock:
            clock["reached"] = clock["evals"][-1]
            return True
        return False

    def on_step(step: int) -> None:
        if step == FIRST_STEPS:
            clock["first_steps"] = time.perf_counter() - clock["start"]

    result = train.main(loaded, hooks=train.TrainingHooks(on_train_begin=start_clock, on_evaluate=on_evaluate,
                                                          on_step=on_step))
    _, last_accuracy, wall = clock["evals"][-1]
    return {"train_seconds": result.train_seconds, "wall_seconds": wall, "steps": result.steps,
            "dev_accuracy": last_accuracy, "evals": clock["evals"], "reached": clock.get("reached"),
            "first_steps_seconds": clock.get("first_steps"),
            "training": loaded.training.model_dump(mode="json"),
            "precision": precision(loaded)}


def finetune_trains_cpu_bf16() -> bool:
    """Whether finetune's default precision is bf16 on this machine while the Trainer's default is fp32."""
    import torch

    from finetune.training.preflight import choose_mixed_precision

    return not torch.cuda.is_available() and choose_mixed_precision("auto") == "bf16"


def worker(way: str, spec_file: str, out_file: str) -> int:
    spec = Spec(**json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(run_way(way, spec, in_process=True)))
    return 0


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def run_way(way: str, spec: Spec, in_process: bool = False) -> dict:
    """One way in a fresh process, so none inherits another's warmed-up caches or allocator state; `in_process`
    (--quick, a smoke run whose timings mean nothing) saves each way the seconds of importing the libraries."""
    if in_process:
        if way == "c":
            return run_finetune(spec)
        from finetune.training.speed import release_accelerator

        try:
            return run_trainer(spec, pad_to_max=way == "a", cpu_bf16=way == "d")
        finally:  # the Trainer leaves its Accelerate state (bf16 for (d)) to the rest of the process: the test suite
            release_accelerator()
    spec_file, out_file = Path(spec.workdir) / f"spec-{way}.json", Path(spec.workdir) / f"result-{way}.json"
    spec_file.write_text(json.dumps(asdict(spec)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", way, "--spec", str(spec_file), "--out", str(out_file)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"way ({way}) failed: {shlex.join(cmd)}\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads(out_file.read_text())


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def mean_of_repeats(runs: list[dict]) -> dict:
    """One way's result over its repeats: mean training time and accuracy, and every repeat's accuracy."""
    import statistics

    merged = dict(runs[0])
    merged["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
    merged["dev_accuracies"] = [r["dev_accuracy"] for r in runs]
    merged["dev_accuracy"] = statistics.fmean(merged["dev_accuracies"])
    merged["dev_accuracy_sd"] = statistics.stdev(merged["dev_accuracies"]) if len(runs) > 1 else 0.0
    return merged


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=CHECKPOINT, help=f"checkpoint for every way (default {CHECKPOINT})")
    parser.add_argument("--train-size", type=int, default=4096, help="seeded random SST-2 training sentences (default 4096)")
    parser.add_argument("--dev-size", type=int, help="SST-2 dev sentences to score (default: all 872)")
    parser.add_argument("--ways", help="which ways to run (default a,b,c, and d on a CPU that computes bf16)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=128, help="truncation (and (a)'s padding) length (default 128)")
    parser.add_argument("--seed", type=int, default=42, help="data subset seed, and the first training seed unless --first-training-seed")
    parser.add_argument("--first-training-seed", type=int,
                        help="training seed of the first repeat (default --seed); more seeds on the same data subset")
    parser.add_argument("--repeats", type=int, default=1,
                        help="train every way this many times with training seeds S, S+1, ... (S: --first-training-seed); the table shows means "
                             "(accuracy on 872 sentences moves by about a point from seed to seed)")
    parser.add_argument("--finetune", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for (c)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 sentences, 64 dev sentences, every way in this process")
    parser.add_argument("--time-to-accuracy", action="store_true",
                        help="(b) and (c) on the full SST-2 train split, evaluating every --eval-steps until --target")
    parser.add_argument("--target", type=float, default=0.88, help="time-to-accuracy target (default 0.88)")
    parser.add_argument("--eval-steps", type=int, default=100, help="time to accuracy: steps between evaluations")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=list(WAYS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.spec, args.out)

    if args.quick:
        args.train_size, args.dev_size = 128, args.dev_size or 64
    if args.repeats < 1 or (args.repeats > 1 and args.time_to_accuracy):
        print("error: --repeats must be at least 1, and 1 with --time-to-accuracy", file=sys.stderr)
        return 2
    train_size = None if args.time_to_accuracy else args.train_size
    first_seed = args.seed if args.first_training_seed is None else args.first_training_seed
    if args.ways:
        ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    else:
        # (a) pads to 128 and would take hours to reach the target on a CPU; run it with --ways if wanted.
        ways = (["b", "c"] if args.time_to_accuracy else ["a", "b", "c"]) + (["d"] if finetune_trains_cpu_bf16() else [])
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        print(f"error: unknown way(s) {', '.join(unknown)}; choose from {', '.join(WAYS)}", file=sys.stderr)
        return 2

    data = sst2_dir()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
        work = Path(workdir)
        train_file = write_subset(data / "train.tsv", work / "train.tsv", train_size, args.seed)
        dev_file = write_subset(data / "dev.tsv", work / "dev.tsv", args.dev_size, args.seed)
        spec = Spec(checkpoint=args.checkpoint, train_file=str(train_file), dev_file=str(dev_file),
                    max_length=args.max_length, batch_size=args.batch_size, learning_rate=args.learning_rate,
                    epochs=args.epochs, seed=first_seed, finetune_overrides=list(args.finetune), workdir=workdir,
                    logging_steps=2 if args.quick else 50,
                    eval_steps=args.eval_steps if args.time_to_accuracy else None,
                    target=args.target if args.time_to_accuracy else None)
        path = resolve(args.checkpoint)
        texts = [r["sentence"] for r in read_tsv(train_file)]
        lengths = token_lengths(path, texts, args.max_length)
        shape = model_shape(path)
        peak = peak_matmul_flops(n=1024, repeats=5, trials=3) if args.quick else peak_matmul_flops()
        results = {}
        for way in ways:
            # Repeats differ in the training seed only (head initialisation, data order, dropout), never the data.
            runs = []
            for k in range(args.repeats):
                folder = Path(workdir) / f"{way}-{k}"
                folder.mkdir()
                runs.append(run_way(way, Spec(**{**asdict(spec), "seed": first_seed + k, "workdir": str(folder)}),
                                    in_process=args.quick))
            results[way] = mean_of_repeats(runs)

    info = describe_machine(("torch", "transformers", "accelerate"))
    epoch_flops = model_flops(lengths, shape)
    for r in results.values():
        # Samples and FLOPs of the steps actually trained (all of them, unless time to accuracy stopped early).
        done = min(1.0, r["steps"] * args.batch_size / max(1, len(texts) * args.epochs))
        r["samples"] = len(texts) * args.epochs * done
        r["samples_per_s"] = r["samples"] / r["train_seconds"]
        r["real_tokens_per_s"] = sum(lengths) * args.epochs * done / r["train_seconds"]
        r["mfu"] = epoch_flops * args.epochs * done / r["train_seconds"] / peak

    print(f"machine: {info['cpu']}, {info['cores']} cores{', GPU ' + info['gpu'] if info['gpu'] else ''}; torch "
          f"{info['torch']} ({info['threads']} threads), transformers {info['transformers']}, accelerate "
          f"{info['accelerate']}, python {info['python']}; load average before {load_before:.2f}")
    print(f"command: python {shlex.join(['bench/train.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(f"checkpoint: {args.checkpoint} ({shape['non_embedding_params'] / 1e6:.1f}M non-embedding parameters, "
          f"{shape['layers']} layers, hidden {shape['hidden']}); data: {len(texts)} SST-2 training sentences "
          f"({'all' if train_size is None else f'seeded subset, seed {args.seed}'}; mean {sum(lengths) / len(lengths):.1f} "
          f"tokens, max {max(lengths)}), {args.epochs:g} epoch(s), batch {args.batch_size}, lr {args.learning_rate:g}, "
          f"linear schedule, warmup 10%, weight decay 0.01, max_length {args.max_length}; dev: {args.dev_size or 872} sentences")
    print(f"fp32 matmul peak (torch.mm, measured now): {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs per epoch {epoch_flops / 1e12:.2f} TFLOP (6N*L + 12*layers*d*L^2 per example, real tokens only)")
    if "c" in results:
        overrides = " ".join(args.finetune) or "none"
        t = results["c"]["training"]
        print(f"finetune (c): group_by_length={t.get('group_by_length')}, compile={t.get('compile')}, "
              f"mixed_precision={t.get('mixed_precision')} (here {results['c']['precision']}); overrides: {overrides}")
    print()
    if args.repeats > 1:
        print(f"each way trained {args.repeats} times (seeds {first_seed}..{first_seed + args.repeats - 1}): "
              "time and accuracy are means, +- the accuracy's standard deviation")
    print(f"{'way':<4} {'what':<52} {'samples/s':>10} {'tokens/s':>9} {'MFU':>6} {'train s':>8} {'steps':>6} "
          f"{'first ' + str(FIRST_STEPS) + ' s':>12} {'dev acc':>8}")
    for way, r in results.items():
        spread = f" +- {r['dev_accuracy_sd']:.4f}" if args.repeats > 1 else ""
        print(f"({way}) {WAYS[way]:<52} {r['samples_per_s']:>10.1f} {r['real_tokens_per_s']:>9.0f} "
              f"{r['mfu'] * 100:>5.1f}% {r['train_seconds']:>8.1f} {r['steps']:>6} {_seconds(r.get('first_steps_seconds')):>12} "
              f"{r['dev_accuracy']:>8.4f}{spread}")
    print()
    for base in ("a", "b", "d"):
        if "c" in results and base in results:
            c, b = results["c"], results[base]
            print(f"ratio (c)/({base}): samples/s {c['samples_per_s'] / b['samples_per_s']:.2f}x, "
                  f"dev accuracy {100 * (c['dev_accuracy'] - b['dev_accuracy']):+.2f} points")
    if args.time_to_accuracy:
        print()
        for way, r in results.items():
            reached = r.get("reached")
            figure = (f"reached {reached[1]:.4f} at step {reached[0]} after {reached[2]:.0f} s wall "
                      f"({r['train_seconds']:.0f} s training, the rest evaluation and checkpoints)"
                      if reached else f"did not reach {args.target} in {r['steps']} steps (best {max(e[1] for e in r['evals']):.4f})")
            print(f"time to accuracy {args.target} ({way}): {figure}")
            print(f"  evaluations (step, accuracy, s): {', '.join(f'({s}, {a:.3f}, {t:.0f})' for s, a, t in r['evals'])}")
        for base in ("b", "d"):
            if {base, "c"} <= set(results) and results[base].get("reached") and results["c"].get("reached"):
                print(f"ratio ({base})/(c) wall time to {args.target}: "
                      f"{results[base]['reached'][2] / results['c']['reached'][2]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": {**info, "load_before": load_before}, "args": vars(args),
                                               "peak_flops": peak, "epoch_flops": epoch_flops, "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
