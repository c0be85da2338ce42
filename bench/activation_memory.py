"""Activation memory of one training step: attention dropout on or off, gradient checkpointing, side by side.

The offline MiniLM with a QA head, a batch of 32 x 256 tokens with padding (as QA windows have), fp32, each
variant in a fresh process: the resident memory the step adds over the loaded model (its peak, from
/proc/self/status VmHWM), and the step's time (best of the steps after a warm-up). What `model.attention_dropout`
and `training.gradient_checkpointing` do, and why the offline QA recipe sets `attention_dropout: 0`.

    python bench/activation_memory.py
    python bench/activation_memory.py --batch 16 --length 384 --steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fresh_process import run_worker

VARIANTS = {
    "default": "the checkpoint's attention dropout (0.1)",
    "attention_dropout=0": "model.attention_dropout: 0",
    "gradient_checkpointing": "training.gradient_checkpointing: true (attention dropout 0.1)",
}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(variant: str, batch: int, length: int, steps: int) -> dict:
    import torch
    from transformers import AutoModelForQuestionAnswering

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from finetune.models.pretrained import resolve_checkpoint

    torch.manual_seed(0)
    extra = {"attention_probs_dropout_prob": 0.0} if variant == "attention_dropout=0" else {}
    path = resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2").path
    model = AutoModelForQuestionAnswering.from_pretrained(path, **extra)
    if variant == "gradient_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[:, length * 3 // 4:] = 0  # the shorter windows of a batch are padded
    zeros = torch.zeros(batch, dtype=torch.long)
    base = _status_mb("VmRSS")
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, start_positions=zeros, end_positions=zeros).loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"variant": variant, "base_mb": base, "peak_over_base_mb": _status_mb("VmHWM") - base,
            "step_s": min(times[1:] or times)}


def main(argv: list[str] | None = None) -> int:
    """Run each variant in its own process and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="training steps per variant (the first is a warm-up)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.length, args.steps)))
        return 0
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    rows = []
    for variant in variants:
        rows.append(run_worker(__file__, variant, "--batch", str(args.batch), "--length", str(args.length),
                               "--steps", str(args.steps)))
    from machine_info import describe_machine

    machine = describe_machine(["torch", "transformers"])
    print(f"MiniLM QA head, batch {args.batch} x {args.length} tokens (a quarter padding), fp32; {machine['cpu']}, "
          f"{machine['cores']} CPUs; {time.strftime('%Y-%m-%d')}")
    print("| variant | step's peak over the loaded model | step time | vs the first row |\n|---|---|---|---|")
    first = rows[0]
    for r in rows:
        print(f"| {VARIANTS[r['variant']]} | {r['peak_over_base_mb'] / 1024:.2f} GiB | {r['step_s']:.2f} s | "
              f"{r['peak_over_base_mb'] / first['peak_over_base_mb']:.2f}x memory, "
              f"{r['step_s'] / first['step_s']:.2f}x time |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
