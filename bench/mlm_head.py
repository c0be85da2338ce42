"""Masked-LM training step: the vocabulary projected at every position (transformers' own head and loss) against
only at the masked positions (finetune's `MaskedLMTask.forward`), side by side.

The offline MiniLM with a new MLM head (as `finetune pretrain` builds it: output tied to the word embeddings),
random word pieces with 15% of the positions as targets, fp32, each variant in a fresh process: the step's time
(best of the steps after a warm-up) and the resident memory the step adds over the loaded model (its peak, from
/proc/self/status VmHWM). Why pretraining computes the head only where there is a loss.

With `--family`, the same for another family's masked-LM model at MiniLM's size (6 layers, 384 wide) with that
family's real vocabulary (RoBERTa 50,265 pieces, ModernBERT 50,368, EuroBERT 128,256, ...), random weights: the
shortcut's gain grows with the vocabulary, since the head is one vocabulary-wide projection per position.

    python bench/mlm_head.py                          # quickstart-mlm.yaml's shape: 32 x 128 tokens
    python bench/mlm_head.py --batch 8 --length 512 --steps 4
    python bench/mlm_head.py --family roberta         # a family that had no shortcut before issue 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from activation_memory import _status_mb
from fresh_process import run_worker

VARIANTS = {
    "full": "every position (transformers' own masked-LM model, given the labels)",
    "masked": "masked positions only (finetune)",
}


# Each family's real vocabulary size (its base checkpoint's), for --family.
VOCABULARY = {"bert": 30522, "distilbert": 30522, "big_bird": 50358, "roberta": 50265, "xlm-roberta": 250002,
              "deberta-v2": 128100, "electra": 30522, "modernbert": 50368, "eurobert": 128256}


def family_model(family: str, length: int):
    """A masked-LM model of `family` at MiniLM's size with the family's vocabulary, random weights."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    sizes = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                 vocab_size=VOCABULARY[family], max_position_embeddings=max(length + 2, 512))
    extra = {"big_bird": dict(attention_type="original_full"), "distilbert": dict(dim=384, n_layers=6, n_heads=12,
                                                                                   hidden_dim=1536),
             "eurobert": dict(num_key_value_heads=12, pad_token_id=1, bos_token_id=2, eos_token_id=3, mask_token_id=4),
             "modernbert": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)}
    config = AutoConfig.for_model(family, **sizes, **extra.get(family, {}))
    model = AutoModelForMaskedLM.from_config(config)
    model.tie_weights()  # as finetune pretrain builds a new head: the output projection is the word embeddings
    return model


def worker(variant: str, batch: int, length: int, steps: int, family: str = "minilm") -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from finetune.config.recipe import ModelSection
    from finetune.models.modeling import build_model
    from finetune.models.pretrained import resolve_checkpoint
    from finetune.tasks import IGNORE_INDEX, TaskSettings
    from finetune.tasks.masked_lm import MASKED_LM

    torch.manual_seed(0)
    if family == "minilm":
        checkpoint = "sentence-transformers/all-MiniLM-L6-v2"
        model, _ = build_model(resolve_checkpoint(checkpoint), ModelSection(checkpoint=checkpoint, max_length=length),
                               MASKED_LM, None)
    else:
        model = family_model(family, length)
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, length), generator=generator)
    labels = ids.masked_fill(torch.rand(batch, length, generator=generator) >= 0.15, IGNORE_INDEX)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base = _status_mb("VmRSS")
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        if variant == "full":
            loss = model(**inputs, labels=labels).loss
        else:
            loss = MASKED_LM.loss(MASKED_LM.forward(model, inputs, {"labels": labels}), {"labels": labels}, TaskSettings())
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"variant": variant, "loss": float(loss), "base_mb": base, "peak_over_base_mb": _status_mb("VmHWM") - base,
            "step_s": min(times[1:] or times)}


def main(argv: list[str] | None = None) -> int:
    """Run each variant in its own process and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="training steps per variant (the first is a warm-up)")
    parser.add_argument("--family", default="minilm", choices=["minilm", *VOCABULARY],
                        help="minilm (the offline checkpoint, default) or a family at MiniLM's size, random weights")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.length, args.steps, args.family)))
        return 0
    rows = []
    for variant in VARIANTS:
        rows.append(run_worker(__file__, variant, "--batch", str(args.batch), "--length", str(args.length),
                               "--steps", str(args.steps), "--family", args.family))
    from machine_info import describe_machine

    machine = describe_machine(["torch", "transformers"])
    what = ("MiniLM + new MLM head" if args.family == "minilm" else
            f"{args.family} masked-LM model at MiniLM's size (6 x 384), {VOCABULARY[args.family]:,}-piece vocabulary, "
            "random weights")
    print(f"{what}, batch {args.batch} x {args.length} tokens, 15% targets, fp32; {machine['cpu']}, "
          f"{machine['cores']} CPUs; {time.strftime('%Y-%m-%d')}")
    print("| head computed at | step time | step's peak over the loaded model | loss of the last step | vs the first row |\n"
          "|---|---|---|---|---|")
    first = rows[0]
    for r in rows:
        print(f"| {VARIANTS[r['variant']]} | {r['step_s']:.3f} s | {r['peak_over_base_mb'] / 1024:.2f} GiB | {r['loss']:.4f} | "
              f"{first['step_s'] / r['step_s']:.2f}x faster, {r['peak_over_base_mb'] / first['peak_over_base_mb']:.2f}x memory |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
