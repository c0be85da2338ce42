"""One SetFit 1.2 training run for bench/fewshot.py, run with the SetFit venv's Python (bench/peers/setup_setfit.sh).

Trains SetFit on a drawn JSONL file ({text, label} per line) from a local sentence-transformers body, with SetFit's
defaults except what the benchmark sets to match our method (pair iterations, batch size, max length, seed), scores
the test JSONL file, and prints one JSON line: {"accuracy": ..., "seconds": ...} (seconds: trainer.train() alone).
With --label-template, SetFit's own `get_templated_dataset` first adds --label-examples sentences per class (the
template with the class's name), as training.contrastive.label_template does for ours.
It imports nothing from finetune: it runs in another venv.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings


def read(path: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--label-names", nargs="+", help="the classes, in order (needed with --label-template)")
    parser.add_argument("--label-template", default=None)
    parser.add_argument("--label-examples", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments, get_templated_dataset

    texts, labels = read(args.train)
    train = Dataset.from_dict({"text": texts, "label": labels})
    if args.label_template:
        ids = {name: i for i, name in enumerate(args.label_names)}
        train = get_templated_dataset(Dataset.from_dict({"text": texts, "label": [ids[x] for x in labels]}),
                                      candidate_labels=args.label_names, template=args.label_template,
                                      sample_size=args.label_examples)
        train = train.map(lambda row: {"label": args.label_names[row["label"]]})
    model = SetFitModel.from_pretrained(args.model)
    model.model_body.max_seq_length = args.max_length
    trainer = Trainer(model=model, train_dataset=train,
                      args=TrainingArguments(batch_size=args.batch_size, num_iterations=args.iterations, num_epochs=1,
                                             seed=args.seed, report_to="none", show_progress_bar=False,
                                             output_dir=os.path.join(os.getcwd(), "setfit-checkpoints"),
                                             save_strategy="no"))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    test_texts, test_labels = read(args.test)
    predicted = [str(p) for p in model.predict(test_texts, batch_size=64, as_numpy=True)]
    accuracy = sum(p == g for p, g in zip(predicted, test_labels)) / len(test_labels)
    print(json.dumps({"accuracy": accuracy, "seconds": seconds}))


if __name__ == "__main__":
    main()
