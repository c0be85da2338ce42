"""Which head reads a contrastive body best (issue 36): ours against SetFit's, on raw and L2-normalised embeddings.

training.method contrastive trains the encoder on pairs, then the head on the frozen embeddings. When ours trails
SetFit on a set, this tells whether the head is to blame or the body: on the bodies that bench/fewshot.py's
contrastive cells saved in a workdir (`{set}-n{N}-d{draw}-contrastive/best`), it embeds the draw's training texts
(with the run's own label sentences, `finetune.data.loading.label_sentences` of the saved recipe) and the test
split once, as the head reads them (the attention-masked mean of the final hidden states), and trains on them:

  ours     a head shaped like the one the run trained (BERT's pooler, dense + tanh, started from the checkpoint's, then
           dropout and a fresh classifier; AdamW at 1e-3 with weight decay 0.01 for 10 epochs of 16, linear decay,
           gradients clipped at 1, as bench/fewshot.py's head phase), the mean of --seeds seeds
  logreg   scikit-learn's LogisticRegression (C = 1), SetFit's head

each once on the raw means and once L2-normalised (what SetFit reads from the MiniLM, whose sentence-transformers
pipeline ends in a Normalize module). Figures: test accuracy per draw and head, and the mean norm of the raw
embeddings. Bodies whose family has no BERT-style pooler get the dense + tanh head freshly initialised.

    python bench/fewshot_heads.py --workdir runs/fewshot-bbc-8 --sets bbc --ns 8
    python bench/fewshot_heads.py --workdir runs/fewshot-bbc-8 --sets bbc --ns 8 --head-texts drawn   # no sentences
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fewshot  # noqa: E402  (the sets and the checkpoint)
from machine_info import describe_machine  # noqa: E402
from recipe_runs import markdown  # noqa: E402

HEADS = ("ours raw", "ours normalised", "logreg raw", "logreg normalised")
EPOCHS, LEARNING_RATE, BATCH, WEIGHT_DECAY = 10, 1e-3, 16, 0.01


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def embed(folder: Path, splits: list[list[str]], max_length: int) -> list[np.ndarray]:
    """For each list of texts, the mean of the final hidden states over each text's tokens: what the run's head reads
    (model.pooling mean). The body is loaded once for all the lists."""
    from transformers import AutoModel, AutoTokenizer

    from finetune.families.pooling import masked_mean

    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
    embedded = []
    with torch.inference_mode():
        for texts in splits:
            out = []
            for i in range(0, len(texts), 32):
                batch = tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=max_length,
                                  return_tensors="pt")
                out.append(masked_mean(encoder(**batch).last_hidden_state, batch["attention_mask"]))
            embedded.append(torch.cat(out).float().numpy())
    return embedded


def checkpoint_pooler() -> dict[str, torch.Tensor] | None:
    """The checkpoint's own pooler weights (dense), which the run's head starts from; None when it has none."""
    from transformers import AutoModel

    from finetune.models.pretrained import resolve_checkpoint

    model = AutoModel.from_pretrained(resolve_checkpoint(fewshot.MODEL).path, use_safetensors=True)
    pooler = getattr(model, "pooler", None)
    dense = getattr(pooler, "dense", None)
    return dense.state_dict() if isinstance(dense, torch.nn.Linear) else None


def our_head(x: np.ndarray, y: np.ndarray, test: np.ndarray, classes: int, pooler: dict | None,
             seed: int) -> np.ndarray:
    """Predictions of a dense + tanh + classifier head trained as bench/fewshot.py's head phase trains ours."""
    torch.manual_seed(seed)
    width = x.shape[1]
    dense, classifier, dropout = torch.nn.Linear(width, width), torch.nn.Linear(width, classes), torch.nn.Dropout(0.1)
    if pooler is not None and pooler["weight"].shape == dense.weight.shape:
        dense.load_state_dict(pooler)
    torch.nn.init.normal_(classifier.weight, std=0.02)
    torch.nn.init.zeros_(classifier.bias)
    params = [*dense.parameters(), *classifier.parameters()]
    groups = [{"params": [dense.weight, classifier.weight]},  # decay on weight matrices only, as the run's optimizer
              {"params": [dense.bias, classifier.bias], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    inputs, labels = torch.tensor(x), torch.tensor(y)
    steps = EPOCHS * -(-len(inputs) // BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    order = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(inputs), generator=order).split(BATCH):
            logits = classifier(dropout(torch.tanh(dense(inputs[idx]))))
            torch.nn.functional.cross_entropy(logits, labels[idx]).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    with torch.inference_mode():
        return classifier(torch.tanh(dense(torch.tensor(test)))).argmax(1).numpy()


def heads(x: np.ndarray, y: np.ndarray, test: np.ndarray, gold: np.ndarray, classes: int, pooler: dict | None,
          seeds: int) -> dict[str, float]:
    """Test accuracy of each head in HEADS on these embeddings."""
    from sklearn.linear_model import LogisticRegression

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    got = {}
    for how, f in (("raw", lambda a: a), ("normalised", unit)):
        got[f"ours {how}"] = statistics.mean(float((our_head(f(x), y, f(test), classes, pooler, s) == gold).mean())
                                             for s in range(seeds))
        logreg = LogisticRegression(C=1.0, max_iter=3000).fit(f(x), y)
        got[f"logreg {how}"] = float((logreg.predict(f(test)) == gold).mean())
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a bench/fewshot.py workdir")
    parser.add_argument("--sets", nargs="+", choices=list(fewshot.SETS), default=list(fewshot.SETS))
    parser.add_argument("--ns", nargs="+", type=int, default=[8, 16, 32, 64], help="examples per class")
    parser.add_argument("--draws", nargs="+", type=int, default=list(range(5)))
    parser.add_argument("--seeds", type=int, default=3, help="seeds of our head, averaged")
    parser.add_argument("--head-texts", choices=["all", "drawn"], default="all",
                        help="what the heads train on: all the run's training texts (with its label sentences, as "
                             "the run's head did) or the drawn examples alone")
    args = parser.parse_args(argv)
    import transformers

    from finetune.config.recipe import load_recipe
    from finetune.data.loading import label_sentences

    transformers.logging.set_verbosity_error()  # each body's load report (the unloaded classifier) is noise
    started, pooler, rows = time.perf_counter(), checkpoint_pooler(), []
    for key in args.sets:
        spec, names = fewshot.SETS[key], fewshot.SETS[key]["names"]
        test_path = args.workdir / f"{key}-test.jsonl"
        if not test_path.is_file():
            continue
        test = read_jsonl(test_path)  # the same split for every N and draw of the set
        test_texts, gold = [r["text"] for r in test], np.array([names.index(r["label"]) for r in test])
        for n in args.ns:
            for d in args.draws:
                body = args.workdir / f"{key}-n{n}-d{d}-contrastive" / "best"
                if not (body / "model.safetensors").is_file():
                    continue
                train = read_jsonl(args.workdir / f"{key}-n{n}-d{d}.jsonl")
                extra = label_sentences(load_recipe(body / "recipe.yaml"), names) if args.head_texts == "all" else []
                texts = [r["text"] for r in train] + [text for text, _ in extra]
                y = np.array([names.index(r["label"]) for r in train] + [names.index(name) for _, name in extra])
                x, t = embed(body, [texts, test_texts], spec["max_length"])
                got = heads(x, y, t, gold, len(names), pooler, args.seeds)
                norm = float(np.linalg.norm(x, axis=1).mean())
                print(f"{spec['name']} N={n} draw {d}: " + ", ".join(f"{h} {got[h]:.4f}" for h in HEADS)
                      + f"; mean norm {norm:.2f}", flush=True)
                rows.append([spec["name"], str(n), str(d), *[f"{got[h]:.4f}" for h in HEADS], f"{norm:.2f}"])
    if not rows:
        print(f"no contrastive bodies in {args.workdir} for these sets, Ns and draws", file=sys.stderr)
        return 1
    info = describe_machine(("torch", "scikit-learn"))
    table = markdown(["set", "N per class", "draw", *HEADS, "mean norm"], rows)
    print(f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, scikit-learn {info['scikit-learn']}\n"
          f"command: python {shlex.join(['bench/fewshot_heads.py', *(argv if argv is not None else sys.argv[1:])])}\n"
          f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {time.perf_counter() - started:.0f} s in all\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
