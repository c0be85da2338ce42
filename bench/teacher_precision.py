"""The distillation teacher's one pass in fp32 against bf16 autocast (`distillation.teacher_precision`), side by side.

Runs `finetune.training.teacher.teacher_outputs` over the same texts in both precisions, in rounds that alternate
which goes first (so a neighbour busy for part of the run weighs on both), and compares what the student would be
trained on: the share of texts whose top class is the same, and the largest difference between the softened
probabilities softmax(logits / T).

    python bench/teacher_precision.py runs/quickstart/best --texts ../shared/data/sst2/train.tsv --column sentence
    python bench/teacher_precision.py MODEL --texts data/sst2/train.tsv --limit 64 --rounds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

from machine_info import describe_machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def read_texts(path: str, column: str, limit: int | None) -> list[str]:
    """One column of a csv or tsv file (tab-separated when the name ends in .tsv), as the SST-2 copies are written."""
    tsv = path.endswith(".tsv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        if column not in (rows.fieldnames or []):
            sys.exit(f"--column: {column!r} is not a column of {path}; it has {', '.join(rows.fieldnames or [])}")
        texts = [row[column] for row in rows]
    return texts[:limit] if limit else texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the teacher: a fine-tuned classification model folder")
    parser.add_argument("--texts", required=True, help="a csv or tsv file of texts")
    parser.add_argument("--column", default="sentence", help="the column holding the texts (default sentence)")
    parser.add_argument("--limit", type=int, help="only the first N texts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one fp32 and one bf16 pass (default 3)")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature for the comparison")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from finetune.models.predictor import Predictor
    from finetune.tasks.base import softmax
    from finetune.training.teacher import teacher_outputs

    teacher = Predictor.from_dir(args.model)
    texts = read_texts(args.texts, args.column, args.limit)
    machine = describe_machine(["torch", "transformers"])
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; "
          f"{len(texts)} texts from {args.texts}; teacher {args.model}")
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    outputs: dict[str, np.ndarray] = {}
    for round_ in range(args.rounds):
        for precision in (("fp32", "bf16") if round_ % 2 == 0 else ("bf16", "fp32")):
            started = time.perf_counter()
            outputs[precision], _ = teacher_outputs(teacher, texts, None, hidden=False, precision=precision)
            seconds[precision].append(time.perf_counter() - started)
    ratios = [f / b for f, b in zip(seconds["fp32"], seconds["bf16"])]
    fp32, bf16 = outputs["fp32"], outputs["bf16"]
    agree = float((fp32.argmax(axis=1) == bf16.argmax(axis=1)).mean())
    gap = float(np.abs(softmax(fp32 / args.temperature) - softmax(bf16 / args.temperature)).max())
    result = {"machine": machine, "texts": len(texts), "seconds": seconds, "speedup": statistics.median(ratios),
              "speedups": ratios, "top_class_agreement": agree, "max_softened_difference": gap,
              "temperature": args.temperature, "threads": torch.get_num_threads()}
    print("\n| teacher pass | median time | texts/s |\n|---|---|---|")
    for precision in ("fp32", "bf16"):
        median = statistics.median(seconds[precision])
        print(f"| {precision} | {median:.1f} s | {len(texts) / median:.0f} |")
    print(f"\nbf16 / fp32 speed-up: {result['speedup']:.2f}x (median of the rounds' ratios: "
          f"{', '.join(f'{r:.2f}x' for r in ratios)}); top class the same for {agree:.2%} of the texts; largest "
          f"difference in softmax(logits / {args.temperature:g}): {gap:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
