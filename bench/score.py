"""File scoring benchmark: `finetune predict --input/--output` rows/s against the model alone, same batch size,
on a quiet machine and with one core taken by another process.

The model alone is `Predictor.outputs` on inputs tokenised beforehand: padding, collating and the forward
passes, batched by length, nothing else. File scoring is the whole job as a user runs it: reading the CSV a
chunk at a time, tokenising, the same forward passes, post-processing through the task definition and
writing the output with its progress record.

Each runs in two thread set-ups, side by side (issue 35):
  before  what every prediction path did before issue 35: torch's own pool, a thread per CPU, fixed
          (a fixed budget of <cpus> threads);
  now     the process's thread budget (finetune.threads): the CPUs this process may use, fewer while other
          processes keep cores busy;
and in two conditions: quiet, and `busy` (a bounded busy loop in another process, bench/shared_machine.py's
neighbour, started a few seconds before the measurement so the budget has seen it). Targets: file scoring
>= 0.9x the model alone on a quiet machine, and >= 50% of its quiet rows/s with a core taken.

    python bench/score.py                        # offline MiniLM, 8,192 SST-2 sentences, batch 32
    python bench/score.py --rows 20000 --batch-size 64 --backend onnx
    python bench/score.py --quick                # smoke run (a tiny model is enough: --checkpoint DIR)

The model is the checkpoint with a fresh two-label head (speed does not depend on what the head learnt).
After one warm-up pass over every input, each way runs `--repeats` times, alternating, and the best run of each
is reported.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

from machine_info import describe_machine

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "sentence-transformers/all-MiniLM-L6-v2"
OUTPUTS = itertools.count()


def sentences(rows: int) -> list[str]:
    with open(ROOT / "data" / "sst2" / "train.tsv", encoding="utf-8") as f:
        texts = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    return [texts[i % len(texts)] for i in range(rows)]


def model_folder(checkpoint: str, target: Path, max_length: int) -> Path:
    """A classification model folder from the checkpoint, with a fresh head."""
    import yaml
    from transformers import AutoModelForSequenceClassification

    from finetune.models.modeling import ModelInfo, load_tokenizer, save_model_dir
    from finetune.models.pretrained import resolve_checkpoint

    resolved = resolve_checkpoint(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved.path, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
        use_safetensors=True)
    info = ModelInfo(task="classification", label_names=["negative", "positive"], text_pair=False,
                     max_length=max_length, checkpoint=checkpoint)
    recipe = {"data": {"text_column": "sentence"}}
    return save_model_dir(target, model, load_tokenizer(resolved.path), info, yaml.safe_dump(recipe))


def measure(predictor, features, source: Path, data, settings, work: Path, repeats: int) -> dict[str, float]:
    """Best rows/s of the model alone and of file scoring over `repeats` alternating runs."""
    from finetune.evaluation.scoring import score_file

    alone, scoring = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        predictor.outputs(features)
        alone.append(len(features) / (time.perf_counter() - started))
        output = work / f"out-{next(OUTPUTS)}.csv"  # a new file each time: never a job to resume
        report = score_file(predictor, source, output, data, settings, progress=False)
        scoring.append(report.rows_per_second)
    return {"model_alone": max(alone), "file_scoring": max(scoring), "all_model_alone": alone, "all_file_scoring": scoring}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=CHECKPOINT)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-rows", type=int, default=2048)
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setups", default="before,now", help="thread set-ups (default before,now)")
    parser.add_argument("--conditions", default="quiet,busy", help="quiet and/or busy (default both)")
    parser.add_argument("--quick", action="store_true", help="512 rows, one repeat")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 512, 1
    setups = [s for s in args.setups.split(",") if s]
    conditions = [c for c in args.conditions.split(",") if c]

    from shared_machine import neighbour

    from finetune.evaluation.data import data_section
    from finetune.evaluation.scoring import ScoreSettings
    from finetune.threads import ThreadBudget, affinity_cpus, use_budget
    from finetune.tracking.sources import Located, load_predictor

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        work = Path(tmp)
        folder = model_folder(args.checkpoint, work / "model", args.max_length)
        if args.backend != "torch":
            from finetune.export.onnx import export_onnx

            export_onnx(folder, work / "export", quantize="int8" if args.backend == "onnx-int8" else None, check=False)
            folder = work / "export"
        predictor = load_predictor(Located(folder, None, None, None, str(folder)), backend=args.backend)
        predictor.batch_size = args.batch_size
        texts = sentences(args.rows)
        source = work / "input.csv"
        with open(source, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "sentence"])
            writer.writerows([i, t] for i, t in enumerate(texts))
        features = predictor.encode_inputs(texts).features
        # Warm-up over every input once: the first forward pass at each new shape (batch x length) pays for
        # oneDNN's kernel set-up (measured: 7.5 s for 2,048 sentences cold, 2.7 s warm), which would otherwise
        # land on whichever way runs first.
        predictor.outputs(features)
        data = data_section(str(source), None, {"text_column": "sentence"}, {})
        settings = ScoreSettings(model=str(folder), runtime=predictor.runtime, columns={"data.text_column": "sentence"},
                                 chunk_rows=args.chunk_rows, batch_size=args.batch_size)
        for setup in setups:
            budget = ThreadBudget(len(affinity_cpus())) if setup == "before" else ThreadBudget()
            previous = use_budget(budget)
            try:
                for condition in conditions:
                    with neighbour(condition == "busy", 3600):
                        if condition == "busy":
                            time.sleep(4)  # a few of the budget's samples of the neighbour
                        row = measure(predictor, features, source, data, settings, work, args.repeats)
                    row |= {"setup": setup, "condition": condition, "threads_at_end": budget.threads}
                    results.append(row)
                    print(f"{setup:6} {condition:5}: model alone {row['model_alone']:.1f} rows/s, file scoring "
                          f"{row['file_scoring']:.1f} rows/s ({budget.threads} threads at the end)", flush=True)
            finally:
                budget.close()
                use_budget(previous)
    by = {(r["setup"], r["condition"]): r for r in results}
    summary = {}
    if ("now", "quiet") in by:
        quiet = by["now", "quiet"]
        summary["scoring_vs_model_alone_quiet"] = quiet["file_scoring"] / quiet["model_alone"]
        print(f"now, quiet: file scoring / model alone = {summary['scoring_vs_model_alone_quiet']:.3f} (target >= 0.9)")
    for setup in setups:
        if (setup, "quiet") in by and (setup, "busy") in by:
            share = by[setup, "busy"]["file_scoring"] / by[setup, "quiet"]["file_scoring"]
            summary[f"busy_vs_quiet_{setup}"] = share
            print(f"{setup}: file scoring with a core taken / quiet = {share:.3f}" +
                  (" (target >= 0.5)" if setup == "now" else ""))
    result = {"checkpoint": args.checkpoint, "backend": predictor.runtime, "rows": args.rows,
              "batch_size": args.batch_size, "chunk_rows": args.chunk_rows, "results": results, "summary": summary,
              "machine": describe_machine(["torch", "transformers", "onnxruntime", "pyarrow"])}
    print(json.dumps(result["machine"]))
    print("command: python bench/score.py " + " ".join(sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
