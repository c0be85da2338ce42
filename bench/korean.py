"""Korean with the English MiniLM: NSMC test accuracy as it is, after continued pretraining, and after vocabulary
adaptation plus continued pretraining.

    (a) as-is      finetune run recipes/offline/nsmc-minilm.yaml (the MiniLM reads Hangul as jamo and [UNK]s)
    (b) MLM        finetune pretrain recipes/offline/nsmc-minilm-mlm.yaml (masked LM on the unlabelled reviews,
                   the vocabulary as it is), then (a)'s recipe from its best model
    (c) vocab+MLM  finetune convert --to vocabulary (pieces learned from the unlabelled reviews), the same
                   pretraining from it, then (a)'s recipe from its best model
    (d) vocab      (c) without the pretraining: (a)'s recipe straight from the adapted checkpoint, which shows
                   what the pretraining adds to the new vocabulary

(b) and (c) pretrain for the same number of optimizer steps of the same batch size and length (`--mlm-steps`), so
they get the same pretraining compute; (b)'s jamo sequences hold fewer reviews per 128 tokens. Fine-tuning is
(a)'s recipe in every way (2 epochs on the 19,000 training reviews, 1,000 held out to pick the best epoch; the
5,000 test reviews scored once). Data: ../shared/data/nsmc (see its SOURCE.md).

    python bench/korean.py                    # about 90 min on 2 cores (BENCHMARKS.md)
    python bench/korean.py --ways c --resume  # one way; a stopped run continues, finished commands are read back
    python bench/korean.py --quick            # tiny data, a few steps (the test suite)
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from recipe_runs import ROOT, Runner, markdown, minutes

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
FINETUNE = "recipes/offline/nsmc-minilm.yaml"
PRETRAIN = "recipes/offline/nsmc-minilm-mlm.yaml"
NSMC = ROOT.parent / "shared" / "data" / "nsmc"
WAYS = {"a": "MiniLM as it is", "b": "MiniLM + MLM on the unlabelled reviews",
        "c": "MiniLM + vocabulary adaptation + MLM", "d": "MiniLM + vocabulary adaptation, no MLM"}
ADAPTED = ("c", "d")  # the ways that fine-tune the adapted vocabulary (one conversion, shared)


def pieces_per_review(checkpoint: str, texts: list[str]) -> float:
    """Mean word pieces per review (no special tokens) with the tokenizer a way fine-tunes with."""
    from transformers import AutoTokenizer

    from finetune.models.pretrained import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(checkpoint).path)
    return sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"])) / len(texts)


def test_reviews(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return [row["document"] for row in csv.DictReader(f, delimiter="\t")]


def write_quick_data(folder: Path) -> dict[str, Path]:
    """A few hundred Korean reviews from the shipped sample (data/nsmc), for the smoke run."""
    sample = ROOT / "data" / "nsmc"
    unlabelled = folder / "unlabelled.txt"
    unlabelled.write_text("\n".join(test_reviews(sample / "train.tsv")) + "\n", encoding="utf-8")
    return {"train": sample / "train.tsv", "test": sample / "test.tsv", "unlabelled": unlabelled}


def run(args: argparse.Namespace, runner: Runner, data: dict[str, Path], quick: bool) -> dict:
    work = runner.workdir
    files = [f"data.files.train={data['train']}", f"data.files.test={data['test']}"]
    small = ["training.max_steps=4", "training.eval_strategy=steps", "training.eval_steps=2"] if quick else []
    mlm = [f"data.files.train={data['unlabelled']}", f"training.max_steps={args.mlm_steps}",
           *(["training.eval_steps=2"] if quick else [])]
    rows: dict[str, dict] = {}
    reviews = test_reviews(data["test"])
    converted: float | None = None  # seconds of the one conversion (c) and (d) share
    for way in args.ways:
        seconds: dict[str, float] = {}
        start = args.checkpoint
        if way in ADAPTED:
            if converted is None:
                begun = time.perf_counter()
                runner.finetune("convert", "--to", "vocabulary", "--texts", str(data["unlabelled"]), "--vocab-size",
                                str(args.vocab_size), "--overwrite", args.checkpoint, str(work / "c-vocabulary"))
                converted = time.perf_counter() - begun
            seconds["vocabulary"] = converted
            start = str(work / "c-vocabulary")
        if way in ("b", "c"):
            pretrained = runner.finetune("pretrain", PRETRAIN, f"model.checkpoint={start}", *mlm,
                                         f"output_dir={work / way / 'mlm'}", "tracking.register_as=null",
                                         history=("eval/perplexity",))
            seconds["pretraining"] = pretrained.seconds
            start = str(work / way / "mlm" / "best")
        tuned = runner.finetune("run", FINETUNE, f"model.checkpoint={start}", *files, *small,
                                f"output_dir={work / way / 'nsmc'}", "tracking.register_as=null")
        seconds["fine-tuning"] = tuned.seconds
        rows[way] = {"title": WAYS[way], "test_accuracy": tuned.metrics.get("test/accuracy"),
                     "pieces_per_review": round(pieces_per_review(start, reviews), 2), "seconds": seconds}
        if way in ADAPTED:
            rows[way]["vocabulary"] = json.loads((work / "c-vocabulary" / "conversion.json").read_text(encoding="utf-8"))
    return rows


def report(rows: dict) -> str:
    table = [[f"({way}) {r['title']}", f"{r['test_accuracy']:.4f}", f"{r['pieces_per_review']:.1f}",
              " + ".join(f"{name} {minutes(s)}" for name, s in r["seconds"].items()),
              minutes(sum(r["seconds"].values()))] for way, r in rows.items()]
    return markdown(["way", "NSMC test accuracy", "pieces per test review", "time", "total"], table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", default=",".join(WAYS), help=f"which of {','.join(WAYS)} (default all)")
    parser.add_argument("--checkpoint", default=MINILM, help=f"the English checkpoint (default {MINILM})")
    parser.add_argument("--mlm-steps", type=int, default=900, help="pretraining steps of (b) and (c) (default 900, "
                                                                   "about one epoch of the reviews for (c))")
    parser.add_argument("--vocab-size", type=int, default=16000, help="(c) and (d): size of the vocabulary learned (default 16000)")
    parser.add_argument("--workdir", help="runs and the MLflow store (default runs/bench-korean; --quick: a temporary folder)")
    parser.add_argument("--resume", action="store_true", help="finished commands in --workdir are read back, not run again")
    parser.add_argument("--quick", action="store_true", help="the shipped sample, a few steps (smoke run)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in args.ways if w not in WAYS]
    if unknown:
        parser.error(f"unknown way(s) {', '.join(unknown)}; allowed: {', '.join(WAYS)}")
    if args.quick:
        args.mlm_steps, args.vocab_size = 4, 400
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-korean-") as tmp:
        workdir = Path(args.workdir or (tmp if args.quick else ROOT / "runs" / "bench-korean"))
        runner = Runner(workdir, in_process=args.quick, resume=args.resume)
        data = write_quick_data(Path(tmp)) if args.quick else {
            "train": NSMC / "train.tsv", "test": NSMC / "test.tsv", "unlabelled": NSMC / "unlabelled.txt"}
        rows = run(args, runner, data, args.quick)
    print(f"\ncommand: python {shlex.join(['bench/korean.py', *(argv if argv is not None else sys.argv[1:])])}; "
          f"{minutes(time.perf_counter() - started)} in all\n")
    print(report(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
