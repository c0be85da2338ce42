"""Continued-pretraining benchmarks: fine-tuning with and without masked-language-model pretraining first.

long   Hyperpartisan (../shared/data): MiniLM reading articles in chunks (hyperpartisan-minilm-chunks.yaml) against
       MiniLM converted to BigBird 1,536 (`finetune convert`), MLM-pretrained on the long-document texts
       (hyperpartisan-bigbird-mlm.yaml: Hyperpartisan training articles and BBC News, no test article), then
       fine-tuned with hyperpartisan-minilm-bigbird.yaml's settings (hyperpartisan-minilm-bigbird-pretrained.yaml);
       each fine-tuning over --seeds training seeds (test accuracy and macro-F1, mean ± sd), beside the three
       one-seed rows of BENCHMARKS.md; and the pretraining's time and held-out perplexity curve (with the
       perplexity of positions below and from 512, the ones the conversion tiled).
short  The quickstart fine-tuned from MiniLM and from MiniLM after task-adaptive MLM on its training sentences
       (quickstart-mlm.yaml), over --seeds training seeds: dev accuracy.

Every command runs in a fresh process from the repository root, one after the other, and logs to one MLflow store
in the work folder; the pretraining runs once and every seed fine-tunes from it.

    python bench/pretrain.py long               # about 3.5 h on 2 cores of a bf16 CPU (Zen 4; BENCHMARKS.md)
    python bench/pretrain.py short              # about 25 min
    python bench/pretrain.py long --ways chunks,bigbird,bigbird-mlm   # also the converted BigBird without pretraining
    python bench/pretrain.py long --resume      # continue a stopped run: finished runs are not run again
    python bench/pretrain.py --quick --checkpoint DIR   # both comparisons, tiny data, a few steps (the test suite)
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

from recipe_runs import ROOT, Runner, markdown, mean_sd, minutes

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
OFFLINE = "recipes/offline"
# The three one-seed rows measured for issue 6 (BENCHMARKS.md, "Long documents"), shown beside the new ones.
REFERENCE = [
    ("MiniLM truncated at 512 (BENCHMARKS.md, 1 seed)", "0.7420", "0.7339", "9 min 53 s"),
    ("MiniLM + chunks (BENCHMARKS.md, 1 seed)", "0.8232", "0.8227", "15 min 44 s"),
    ("MiniLM as BigBird 1536, no pretraining (BENCHMARKS.md, 1 seed)", "0.7866", "0.7845", "31 min 40 s"),
]
LONG_WAYS = {
    "chunks": ("MiniLM + chunks", f"{OFFLINE}/hyperpartisan-minilm-chunks.yaml"),
    "bigbird": ("MiniLM as BigBird 1536, no pretraining", f"{OFFLINE}/hyperpartisan-minilm-bigbird.yaml"),
    "bigbird-mlm": ("MiniLM as BigBird 1536, MLM-pretrained", f"{OFFLINE}/hyperpartisan-minilm-bigbird-pretrained.yaml"),
}


def write_quick_documents(folder: Path) -> dict[str, str]:
    """Tiny long-document data from the shipped SST-2 sample: 'articles' of 12 sentences of one sentiment."""
    import csv

    with open(ROOT / "data" / "sst2" / "train.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    by_label = {label: [r["sentence"] for r in rows if r["label"] == label] for label in ("0", "1")}
    files = {}
    for split, start, count in (("train", 0, 24), ("test", 24, 8)):
        path = folder / f"docs-{split}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for i in range(start, start + count):
                label = str(i % 2)
                text = " ".join(by_label[label][i * 12 : i * 12 + 12])
                out.write(json.dumps({"text": text, "label": ["not_hyperpartisan", "hyperpartisan"][i % 2]}) + "\n")
        files[split] = str(path)
    return files


def long_documents(runner: Runner, args, quick: dict | None) -> dict:
    work = runner.workdir / "long"
    tiny = quick is not None
    checkpoint = args.checkpoint or MINILM
    bigbird = dict(max_length=256, block=8, random=2) if tiny else dict(max_length=1536, block=64, random=3)
    model = [f"model.max_length={bigbird['max_length']}", f"model.block_size={bigbird['block']}",
             f"model.num_random_blocks={bigbird['random']}"]
    data = [f"data.files.train={quick['train']}", f"data.files.test={quick['test']}"] if tiny else []
    steps = ["training.max_steps=4", "training.eval_strategy=steps", "training.eval_steps=2"] if tiny else []
    converted = work / "minilm-bigbird"
    needs_bigbird = {"bigbird", "bigbird-mlm"} & set(args.ways)
    if needs_bigbird:
        runner.finetune("convert", "--to", "bigbird", "--max-length", str(bigbird["max_length"]), "--block-size",
                        str(bigbird["block"]), "--num-random-blocks", str(bigbird["random"]), "--overwrite",
                        checkpoint, str(converted))
    pretraining = None
    if "bigbird-mlm" in args.ways:
        pretraining = runner.finetune(
            "pretrain", f"{OFFLINE}/hyperpartisan-bigbird-mlm.yaml", f"model.checkpoint={converted}", *model,
            f"output_dir={work / 'mlm'}", *([f"data.files.train={quick['train']}"] if tiny else []),
            *(["training.max_steps=4", "training.eval_steps=2"] if tiny else []),
            history=("eval/perplexity", "train/loss"))
    rows: dict[str, dict] = {}
    for way in args.ways:
        title, recipe = LONG_WAYS[way]
        overrides = list(data) + list(steps)
        if way == "chunks":
            overrides += [f"model.checkpoint={checkpoint}"] + (["model.max_length=64", "task.chunk_stride=16"] if tiny else [])
        elif way == "bigbird":
            overrides += [f"model.checkpoint={converted}", *model]
        else:
            overrides += [f"model.checkpoint={work / 'mlm' / 'best'}", *model]
        runs = [runner.finetune("run", recipe, *overrides, f"training.seed={seed}", f"output_dir={work / way / str(seed)}",
                                "tracking.experiment=bench-pretrain-long")
                for seed in args.seed_list]
        rows[way] = {"title": title, "recipe": recipe, "seeds": args.seed_list,
                     "test_accuracy": [r.metrics.get("test/accuracy") for r in runs],
                     "test_f1_macro": [r.metrics.get("test/f1_macro") for r in runs],
                     "seconds": [r.seconds for r in runs]}
    report = {"ways": rows}
    if pretraining is not None:
        report["pretraining"] = {"seconds": pretraining.seconds, "run_id": pretraining.run_id,
                                 "perplexity_curve": pretraining.history["eval/perplexity"],
                                 "train_loss": pretraining.history["train/loss"],
                                 "by_position": position_split(runner, pretraining.run_id)}
    return report


def position_split(runner: Runner, run_id: str | None) -> dict[str, float]:
    """Held-out perplexity of the best pretrained model below position 512 and from it (from the run's artifact)."""
    import csv

    if run_id is None:
        return {}
    path = runner.artifact(run_id, "evaluation/loss_by_position.csv")
    sums: dict[str, list[float]] = {"positions 0-511": [0.0, 0.0], "positions 512+": [0.0, 0.0]}
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f):
            key = "positions 0-511" if int(row["positions"].split("-")[0]) < 512 else "positions 512+"
            sums[key][0] += float(row["loss"]) * int(row["masked_tokens"])
            sums[key][1] += int(row["masked_tokens"])
    return {k: math.exp(total / n) for k, (total, n) in sums.items() if n}


def short_texts(runner: Runner, args, quick: dict | None) -> dict:
    work = runner.workdir / "short"
    tiny = quick is not None
    checkpoint = args.checkpoint or MINILM
    small = ["data.max_train_samples=128", "training.max_steps=4"] if tiny else []
    pretraining = runner.finetune("pretrain", "recipes/quickstart-mlm.yaml", f"model.checkpoint={checkpoint}",
                                  f"output_dir={work / 'mlm'}", *(["training.max_steps=4", "data.max_train_samples=200"] if tiny else []),
                                  history=("eval/perplexity",))
    rows = {}
    for way, start in (("quickstart", checkpoint), ("quickstart after task-adaptive MLM", str(work / "mlm" / "best"))):
        runs = [runner.finetune("run", "recipes/quickstart.yaml", f"model.checkpoint={start}", *small,
                                f"training.seed={seed}", f"output_dir={work / way.split()[-1] / str(seed)}",
                                "tracking.register_as=null", "tracking.experiment=bench-pretrain-short")
                for seed in args.seed_list]
        rows[way] = {"dev_accuracy": [r.metrics.get("best/accuracy") for r in runs], "seconds": [r.seconds for r in runs]}
    return {"ways": rows, "pretraining": {"seconds": pretraining.seconds,
                                          "perplexity_curve": pretraining.history["eval/perplexity"]}}


def print_long(report: dict) -> None:
    print("\n### Hyperpartisan: chunks against the BigBird pretrained on long documents\n")
    rows = [[title, "1", acc, f1, time] for title, acc, f1, time in REFERENCE]
    for way in report["ways"].values():
        rows.append([way["title"], str(len(way["seeds"])), mean_sd(way["test_accuracy"]), mean_sd(way["test_f1_macro"]),
                     minutes(sum(way["seconds"]) / len(way["seconds"]))])
    print(markdown(["run", "seeds", "test accuracy", "test macro-F1", "wall time per run"], rows))
    for way in report["ways"].values():
        print(f"- {way['title']}: accuracy per seed {', '.join(f'{a:.4f}' for a in way['test_accuracy'])} "
              f"(seeds {', '.join(map(str, way['seeds']))})")
    if "pretraining" in report:
        p = report["pretraining"]
        print(f"\nPretraining (hyperpartisan-bigbird-mlm.yaml): {minutes(p['seconds'])} wall time; held-out perplexity "
              "by step:\n")
        print(markdown(["step", "perplexity"], [[str(s), f"{v:.2f}"] for s, v in p["perplexity_curve"]]))
        if p["by_position"]:
            print("\nbest checkpoint, held-out perplexity " +
                  ", ".join(f"{k}: {v:.2f}" for k, v in p["by_position"].items()))


def print_short(report: dict) -> None:
    print("\n### SST-2: the quickstart with and without task-adaptive pretraining\n")
    rows = [[way, str(len(r["dev_accuracy"])), mean_sd(r["dev_accuracy"]), ", ".join(f"{a:.4f}" for a in r["dev_accuracy"]),
             minutes(sum(r["seconds"]) / len(r["seconds"]))] for way, r in report["ways"].items()]
    print(markdown(["run", "seeds", "dev accuracy", "per seed", "wall time per run"], rows))
    p = report["pretraining"]
    curve = ", ".join(f"step {s}: {v:.2f}" for s, v in p["perplexity_curve"])
    print(f"\nPretraining (quickstart-mlm.yaml): {minutes(p['seconds'])} wall time; held-out perplexity {curve}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comparison", nargs="?", choices=["long", "short", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per fine-tuning way (default 3)")
    parser.add_argument("--first-seed", type=int, default=42)
    parser.add_argument("--ways", default="chunks,bigbird-mlm", help=f"long: which of {','.join(LONG_WAYS)}")
    parser.add_argument("--checkpoint", help=f"the checkpoint to start from (default {MINILM})")
    parser.add_argument("--workdir", help="where runs and the MLflow store go (default runs/bench-pretrain; "
                                          "--quick: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny data, a few steps, one seed (smoke run)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run of this benchmark in the same --workdir: runs that finished are read back "
                             "from its MLflow store, not run again; an interrupted one continues from its last checkpoint")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in args.ways if w not in LONG_WAYS]
    if unknown:
        parser.error(f"unknown way(s) {', '.join(unknown)}; allowed: {', '.join(LONG_WAYS)}")
    if args.quick:
        args.seeds = 1
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        workdir = Path(args.workdir or (tmp if args.quick else ROOT / "runs" / "bench-pretrain"))
        runner = Runner(workdir, in_process=args.quick, resume=args.resume)
        quick = write_quick_documents(Path(tmp)) if args.quick else None
        report: dict = {}
        if args.comparison in ("long", "both"):
            report["long"] = long_documents(runner, args, quick)
        if args.comparison in ("short", "both"):
            report["short"] = short_texts(runner, args, quick)
    print(f"\ncommand: python {shlex.join(['bench/pretrain.py', *(argv if argv is not None else sys.argv[1:])])}; "
          f"{minutes(time.perf_counter() - started)} in all")
    if "long" in report:
        print_long(report["long"])
    if "short" in report:
        print_short(report["short"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
