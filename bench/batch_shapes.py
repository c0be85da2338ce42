"""Batch-shape benchmark: memory and time of training steps on random-length batches, padded to a multiple or not.

The offline MiniLM with a QA head, batches of 32 with lengths drawn uniformly from 100-256 tokens (a QA recipe's
windows), each length rounded up to each multiple given; fresh process per multiple. Reports the peak and final
resident memory and the time of the steps: what `model.pad_to_multiple_of` does to glibc's allocator and speed.

    python bench/batch_shapes.py                          # multiples 1 and 16, 60 steps, fp32
    python bench/batch_shapes.py --multiples 1,8,16,32 --bf16
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time

from fresh_process import run_worker


def worker(multiple: int, steps: int, bf16: bool) -> dict:
    import torch
    from transformers import AutoModelForQuestionAnswering

    from finetune.models.pretrained import resolve_checkpoint

    torch.manual_seed(0)
    rng = random.Random(0)
    model = AutoModelForQuestionAnswering.from_pretrained(resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2").path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    started = time.perf_counter()
    for _ in range(steps):
        length = -(-rng.randint(100, 256) // multiple) * multiple
        ids = torch.randint(1000, 20000, (32, length))
        zeros = torch.zeros(32, dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), start_positions=zeros, end_positions=zeros).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    resident = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30
    return {"multiple": multiple, "seconds": time.perf_counter() - started, "resident_gib": resident,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiples", default="1,16")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as training on a CPU that computes it")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.bf16)))
        return 0
    for multiple in (int(m) for m in args.multiples.split(",")):
        r = run_worker(__file__, str(multiple), "--steps", str(args.steps), *(["--bf16"] if args.bf16 else []))
        print(f"multiple {multiple}: {args.steps} steps in {r['seconds']:.0f} s, peak {r['peak_gib']:.2f} GiB, "
              f"resident at the end {r['resident_gib']:.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
