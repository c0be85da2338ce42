"""Mixed-adapter batching: three LoRA adapters of one base served together against one plain model served alone.

The three adapters are trained here (`finetune run` on the SST-2 sample shipped in data/sst2, three seeds, LoRA r=8
on the offline MiniLM), so the benchmark needs nothing outside the repository. Then, one server at a time (never
together, so they do not fight for the cores), each facing C closed-loop clients, one SST-2 dev sentence per request:

  plain        the first adapter merged into its base (`finetune export`, served with --backend torch): the same
               network without LoRA, what one ordinary fine-tuned model costs to serve
  one-adapter  `finetune serve --model a=A`: one adapter model alone (its base its own, so the server merges it)
  mixed        `finetune serve --model a=A --model b=B --model c=C`: the clients spread over the three adapters
               (16 clients: 6, 5, 5), which share one batcher and one forward pass per batch
  mixed-peft   the same, each adapted layer run peft's way, adapter by adapter (FINETUNE_MIXED_LORA=peft): what
               the stacked update (`finetune.models.adapter_rows`) is measured against

Figures: requests/s, p50 and p99 (mixed: the worst adapter's p99) of each; mixed / plain throughput (the target is at
least 0.8); mixed / mixed-peft; and the server's resident memory after start-up with one adapter and with three, so
the memory each extra adapter costs.

    python bench/adapters.py              # MiniLM adapters, 16 clients, 20 s after a 2 s warm-up
    python bench/adapters.py --rounds 3   # the four servers three times in turn (medians and every round's ratios)
    python bench/adapters.py --quick      # smoke run: a tiny random model, 6 clients, 2 s (the tests run this)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml
from finetune.models.adapter_rows import WAY_VARIABLE
from distill import ratios_by_round
from machine_info import describe_machine
from serve import OURS, Api, Server, free_port, load_sentences, onnx_folder, run_load
from soak import _rss_mb
from transfer import Runner, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ADAPTERS = ("a", "b", "c")
SHARING = "share one base pass"  # what `finetune serve` logs at start-up for adapters that share passes


def adapter_recipe(workdir: Path, checkpoint: str, train_samples: int) -> Path:
    """SST-2 sentiment with a LoRA adapter, on the shipped sample."""
    recipe = {
        "name": "bench-adapter",
        "model": {"checkpoint": checkpoint, "max_length": 64, "adapter": {"r": 8}},
        "data": {"files": {"train": str(ROOT / "data/sst2/train.tsv"), "validation": str(ROOT / "data/sst2/dev.tsv")},
                 "quoting": "none", "text_column": "sentence", "label_column": "label",
                 "label_names": ["negative", "positive"], "max_train_samples": train_samples, "max_eval_samples": 128},
        "task": {"type": "classification"},
        "training": {"num_epochs": 1, "batch_size": 32, "learning_rate": 1e-3, "logging_steps": 10},
    }
    path = workdir / "adapter.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def spread(clients: int, names: tuple[str, ...]) -> dict[str, int]:
    """Clients per adapter, as even as it goes (16 over three: 6, 5, 5)."""
    return {name: clients // len(names) + (i < clients % len(names)) for i, name in enumerate(names)}


async def mixed_load(url: str, sentences: list[str], clients: dict[str, int], duration: float, warmup: float) -> dict:
    """`run_load` against every adapter's route at once, each with its share of the clients; the total rate, and the
    worst adapter's p50 and p99 (the figures of one adapter's clients are not mixed with another's)."""
    apis = {n: Api(f"/v1/models/{n}/predict", OURS.ready_path, OURS.body, OURS.labels) for n in clients}
    parts = await asyncio.gather(*(run_load(url, sentences, c, duration, warmup, apis[n]) for n, c in clients.items()
                                   if c))
    per = dict(zip([n for n, c in clients.items() if c], parts))
    return {"concurrency": sum(clients.values()), "requests": sum(p["requests"] for p in parts),
            "rps": sum(p["rps"] for p in parts), "p50_ms": max(p["p50_ms"] for p in parts),
            "p99_ms": max(p["p99_ms"] for p in parts), "errors": sum(p["errors"] for p in parts),
            "first_errors": [e for p in parts for e in p["first_errors"]][:3], "per_adapter": per}


def median_round(rounds: list[dict]) -> dict:
    """A server's median round by throughput, with that round's own p50 and p99 (of an even count, the upper)."""
    return sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]


def server_log(server: Server) -> str:
    server.log.seek(0)
    return server.log.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=MINILM, help=f"the adapters' base (default {MINILM})")
    parser.add_argument("--train-samples", type=int, default=2000, help="SST-2 sentences each adapter trains on")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients of every server (default 16)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per server")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each server is started and loaded, in turn (this machine's runs vary by 30%%): "
                             "the table shows each server's median round, the ratios every round's")
    parser.add_argument("--server-args", default="", help='extra arguments for finetune serve, e.g. "--max-wait-ms 10"')
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny random base, 6 clients, 2 s")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.duration, args.warmup, args.train_samples = 6, 2.0, 0.5, 64
    sentences = load_sentences()
    finetune = str(Path(sys.executable).parent / "finetune")
    extra = shlex.split(args.server_args)
    rounds: dict[str, list[dict]] = {}
    memory: dict[str, float] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        workdir = Path(tmp)
        checkpoint = str(tiny_checkpoint(workdir / "tiny")) if args.quick else args.checkpoint
        runner = Runner(workdir, in_process=args.quick, base_overrides=[])
        recipe = adapter_recipe(workdir, checkpoint, args.train_samples)
        trained = {n: runner.run(recipe, [f"training.seed={seed}"]) for seed, n in enumerate(ADAPTERS, 1)}
        folders = {n: r["best_dir"] for n, r in trained.items()}
        plain = onnx_folder(folders["a"], False, workdir)  # the export: the adapter merged into its base
        servers = {
            "plain": (["--model", plain, "--backend", "torch"], {"": args.clients}),
            "one-adapter": (["--model", f"a={folders['a']}"], {"a": args.clients}),
            "mixed": ([arg for n in ADAPTERS for arg in ("--model", f"{n}={folders[n]}")], spread(args.clients, ADAPTERS)),
        }
        servers["mixed-peft"] = servers["mixed"]
        for _ in range(args.rounds):
            for name, (models, clients) in servers.items():
                port = free_port()
                env = {WAY_VARIABLE: "peft"} if name == "mixed-peft" else {WAY_VARIABLE: "stacked"}
                server = Server([finetune, "serve", *models, "--port", str(port), *extra], port, None, env=env)
                try:
                    server.start()
                    memory[name] = _rss_mb(server.proc.pid)  # after loading and the warm-up batch of every model
                    if name.startswith("mixed") and SHARING not in server_log(server):
                        print(f"error: the three adapters do not share passes:\n{server_log(server)[-2000:]}",
                              file=sys.stderr)
                        return 1
                    if "" in clients:
                        got = asyncio.run(run_load(server.url, sentences, args.clients, args.duration, args.warmup))
                    else:
                        got = asyncio.run(mixed_load(server.url, sentences, clients, args.duration, args.warmup))
                    rounds.setdefault(name, []).append(got)
                finally:
                    server.stop()
        results = {n: median_round(r) for n, r in rounds.items()}
        accuracy = {n: r["metrics"].get("best/accuracy") for n, r in trained.items()}

    info = describe_machine(("torch", "transformers", "peft", "fastapi", "uvicorn"))
    print(f"machine: {info['cpu']}, {info['cores']} cores{', GPU ' + info['gpu'] if info['gpu'] else ''}; torch "
          f"{info['torch']}, transformers {info['transformers']}, peft {info['peft']}, python {info['python']}")
    print(f"command: python {shlex.join(['bench/adapters.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {time.time() - started:.0f} s in all")
    print(f"adapters: LoRA r=8 on {'a tiny random BERT (--quick)' if args.quick else args.checkpoint}, "
          f"{args.train_samples} SST-2 sentences each, seeds 1-3; dev accuracy "
          + ", ".join(f"{n} {a:.4f}" if a is not None else f"{n} n/a" for n, a in accuracy.items()))
    print(f"load: {args.clients} closed-loop clients per server, {args.duration:g} s after {args.warmup:g} s of "
          f"warm-up; mixed: {', '.join(f'{c} on {n}' for n, c in spread(args.clients, ADAPTERS).items())}"
          + (f"; {args.rounds} rounds, the servers in turn, each server's median round below"
             if args.rounds > 1 else "")
          + "\n")
    print("| server | clients | req/s | p50 ms | p99 ms | errors | RSS after start-up MB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} "
              f"| {memory[name]:.0f} |")
    ratio = results["mixed"]["rps"] / max(results["plain"]["rps"], 1e-9)
    per_extra = (memory["mixed"] - memory["one-adapter"]) / (len(ADAPTERS) - 1)
    stacking = results["mixed"]["rps"] / max(results["mixed-peft"]["rps"], 1e-9)

    def each(name: str, baseline: str) -> str:
        if args.rounds == 1:
            return ""
        pair = ratios_by_round({baseline: [r["rps"] for r in rounds[baseline]],
                                name: [r["rps"] for r in rounds[name]]})[name]
        return "; round by round " + ", ".join(f"{x:.2f}x" for x in pair)

    p99 = results["mixed"]["p99_ms"] / max(results["plain"]["p99_ms"], 1e-9)
    print(f"\nmixed / plain throughput: {ratio:.2f}x (target >= 0.8); p99 {p99:.2f}x{each('mixed', 'plain')}")
    print(f"mixed / mixed-peft (the stacked update against peft's adapter by adapter): {stacking:.2f}x"
          f"{each('mixed', 'mixed-peft')}")
    print(f"memory per extra adapter: {per_extra:.1f} MB resident ({memory['one-adapter']:.0f} MB with one adapter, "
          f"{memory['mixed']:.0f} MB with {len(ADAPTERS)})")
    failures = [n for n, r in rounds.items() if any(x["errors"] for x in r)]
    for name in failures:
        print(f"errors from {name}, e.g. {next(x for x in rounds[name] if x['errors'])['first_errors']}",
              file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "results": results,
                                               "rounds": rounds,
                                               "rss_mb": memory, "per_extra_adapter_mb": per_extra,
                                               "mixed_over_plain": ratio,
                                               "mixed_over_mixed_peft": stacking, "accuracy": accuracy}, indent=2,
                                              default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
