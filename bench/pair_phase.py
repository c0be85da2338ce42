"""How fast training.method contrastive's pair phase runs in fp32 and in bf16 autocast, side by side (issue 36).

The pair phase follows the run's training precision (`finetune.training.speed.pair_phase_bf16`): bf16 autocast
where the run trains in bf16. This measures what that buys on this machine: the same pairs of the same drawn
examples (bench/fewshot.py's draw, with its label sentences), the same number of steps, once in fp32 and once in bf16
autocast, alternating over several rounds so that drift in the machine's speed falls on both. Figures: seconds per
pair step (the median of the rounds) and bf16's speed-up over fp32. The weights each precision trains are compared
too (largest difference), since a speed-up that changed the result would be no speed-up. bf16 is asked for
explicitly, so on a CPU that does not compute bf16 natively (where `mixed_precision: auto` keeps fp32) the figure
shows what auto avoids.

    python bench/pair_phase.py                               # BBC News at 8 per class, 12 steps, 2 rounds
    python bench/pair_phase.py --sets sst2 agnews bbc --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewshot  # noqa: E402  (the sets, their reading and the draw)
from machine_info import describe_machine  # noqa: E402
from recipe_runs import markdown  # noqa: E402

PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def recipe_for(spec: dict, path: str, precision: str, steps: int):
    from finetune.config.recipe import Recipe

    return Recipe.model_validate({
        "name": "pair-phase", "model": {"checkpoint": path, "max_length": spec["max_length"]},
        "data": {"files": {"train": "unused.jsonl", "validation": "unused.jsonl"}, "label_names": spec["names"]},
        "task": {"type": "classification"}, "output_dir": "unused",
        "training": {"method": "contrastive", "mixed_precision": precision,
                     "contrastive": {"iterations": fewshot.ITERATIONS, "batch_size": fewshot.PAIR_BATCH,
                                     "max_pairs": fewshot.PAIR_BATCH * steps, "label_template": fewshot.LABEL_TEMPLATE,
                                     "label_examples": fewshot.LABEL_EXAMPLES}}})


def examples(spec: dict, n: int, seed: int) -> tuple[list[str], list[int]]:
    """The draw bench/fewshot.py trains on, with the label sentences the run adds to it."""
    from finetune.data.loading import label_sentences

    rows = fewshot.draw(fewshot.read_rows(spec, "train"), spec["names"], n, seed)
    recipe = recipe_for(spec, "unused", "no", 1)
    named = label_sentences(recipe, spec["names"])
    texts = [r["text"] for r in rows] + [text for text, _ in named]
    labels = [spec["names"].index(r["label"]) for r in rows] + [spec["names"].index(name) for _, name in named]
    return texts, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", choices=list(fewshot.SETS), default=["bbc"])
    parser.add_argument("--n", type=int, default=8, help="examples per class (bench/fewshot.py's draw 0)")
    parser.add_argument("--steps", type=int, default=12, help="pair steps per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="fp32 then bf16, this many times")
    args = parser.parse_args(argv)
    from finetune.models.pretrained import resolve_checkpoint
    from finetune.training import contrastive

    path = str(resolve_checkpoint(fewshot.MODEL).path)
    rows = []
    started = time.perf_counter()
    for key in args.sets:
        spec = fewshot.SETS[key]
        texts, labels = examples(spec, args.n, 0)
        per_step: dict[str, list[float]] = {name: [] for name in PRECISIONS}
        weights = {}
        for _ in range(args.rounds):
            for name, precision in PRECISIONS.items():
                phase = contrastive.train_body(recipe_for(spec, path, precision, args.steps), texts, labels, path,
                                               torch.device("cpu"))
                per_step[name].append(phase.seconds / phase.steps)
                weights[name] = phase.weights
                print(f"{spec['name']} {name}: {phase.seconds / phase.steps:.3f} s a step ({phase.precision})",
                      flush=True)
        fp32, bf16 = (statistics.median(per_step[name]) for name in PRECISIONS)
        apart = max((weights["fp32"][k] - weights["bf16"][k]).abs().max().item() for k in weights["fp32"]
                    if weights["fp32"][k].is_floating_point())
        rows.append([spec["name"], str(spec["max_length"]), str(len(texts)), f"{fp32:.3f}", f"{bf16:.3f}",
                     f"{fp32 / bf16:.2f}x", f"{apart:.1e}"])
    info = describe_machine(("torch", "sentence-transformers"))
    table = markdown(["set", "tokens", "examples", "fp32 s/step", "bf16 s/step", "bf16 speed-up",
                      "largest weight difference"], rows)
    print(f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']} ({info['threads']} threads), "
          f"sentence-transformers {info['sentence-transformers']}\n"
          f"command: python {shlex.join(['bench/pair_phase.py', *(argv if argv is not None else sys.argv[1:])])}\n"
          f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {args.steps} steps of {fewshot.PAIR_BATCH} pairs, "
          f"{args.rounds} round(s), medians; {time.perf_counter() - started:.0f} s in all\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
