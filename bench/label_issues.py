"""Label-error benchmark: flip a share of SST-2 training labels at random, find them with `finetune label-issues`.

A seeded subset of the SST-2 sample (data/sst2/train.tsv) gets `--flip` of its labels flipped (seeded too);
`finetune label-issues` trains `--folds` models on the other folds, predicts each held-out fold, and ranks the
examples whose label the out-of-fold model disputes (cleanlab's find_label_issues). Reported: precision (the
share of flagged rows that were flipped), recall (the share of flipped rows that were flagged), and precision
among the top N flagged where N is the number flipped. SST-2's own labels have errors too, so a flagged row
that was not flipped is not always a false alarm.

    python bench/label_issues.py                    # 2,000 sentences, 5% flipped, 5 folds, 1 epoch, offline MiniLM
    python bench/label_issues.py --epochs 2 --rows 4000
    python bench/label_issues.py --quick --checkpoint DIR   # smoke run (the test suite runs this with a tiny model)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from machine_info import describe_machine

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "sentence-transformers/all-MiniLM-L6-v2"


def flipped_subset(rows: int, share: float, seed: int, target: Path) -> set[int]:
    """Write `rows` seeded SST-2 sentences with `share` of their labels flipped; returns the flipped rows."""
    with open(ROOT / "data" / "sst2" / "train.tsv", encoding="utf-8") as f:
        data = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    rng = random.Random(seed)
    chosen = rng.sample(data, rows)
    flipped = set(rng.sample(range(rows), round(rows * share)))
    with open(target, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for i, (sentence, label) in enumerate(chosen):
            f.write(f"{sentence}\t{1 - int(label) if i in flipped else label}\n")
    return flipped


def main(argv: list[str] | None = None) -> int:
    """Flip labels of an SST-2 subset, rank label issues by cross-validation, report precision and recall."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=CHECKPOINT)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--flip", type=float, default=0.05, help="share of labels flipped (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the flips")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--quick", action="store_true", help="200 sentences, 2 folds, 4 steps each")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.folds = 200, 2

    from finetune.config.recipe import Recipe
    from finetune.training.crossval import label_issues

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-label-issues-") as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        os.environ.setdefault("FINETUNE_CACHE_DIR", str(work / "cache"))
        flipped = flipped_subset(args.rows, args.flip, args.seed, work / "train.tsv")
        training = {"num_epochs": args.epochs, "batch_size": 32, "learning_rate": args.learning_rate,
                    "warmup_ratio": 0.1, "logging_steps": 20, "seed": args.seed}
        if args.quick:
            training |= {"max_steps": 4, "learning_rate": 1e-3}
        recipe = Recipe.model_validate({
            "name": "bench-label-issues", "output_dir": str(work / "runs"),
            "model": {"checkpoint": args.checkpoint, "max_length": 64},
            "data": {"files": {"train": str(work / "train.tsv")}, "quoting": "none", "text_column": "sentence",
                     "label_column": "label", "label_names": ["negative", "positive"]},
            "task": {"type": "classification"}, "training": training,
            "tracking": {"log_model": False, "system_metrics": False},
        })
        report = label_issues(recipe, args.folds, work / "issues")
    flagged = set(report.issues["row"])
    top = set(report.issues["row"].head(len(flipped)))
    hits = len(flagged & flipped)
    result = {
        "rows": args.rows, "flipped": len(flipped), "folds": args.folds, "epochs": args.epochs, "seed": args.seed,
        "checkpoint": args.checkpoint, "flagged": len(flagged), "flagged_and_flipped": hits,
        "precision": hits / len(flagged) if flagged else 0.0, "recall": hits / len(flipped) if flipped else 0.0,
        "precision_at_flipped": len(top & flipped) / len(flipped) if flipped else 0.0,
        "out_of_fold": report.metrics, "seconds": time.perf_counter() - started,
        "machine": describe_machine(["torch", "transformers", "cleanlab"]),
    }
    print(f"{args.rows} SST-2 sentences, {len(flipped)} labels flipped (seed {args.seed}), {args.folds} folds x "
          f"{args.epochs:g} epoch(s): out-of-fold accuracy {report.metrics.get('accuracy', float('nan')):.4f}")
    print(f"flagged {len(flagged)}; {hits} of them flipped: precision {result['precision']:.3f}, recall "
          f"{result['recall']:.3f}; precision among the top {len(flipped)}: {result['precision_at_flipped']:.3f} "
          f"({result['seconds']:.0f} s)")
    print(json.dumps(result["machine"]))
    print("command: python bench/label_issues.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
