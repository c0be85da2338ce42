"""The server's ceiling: `finetune serve` around a model that answers at once, closed-loop clients at 16 and 64
(requests/s, p50, p99, the server's CPU per request), for this working tree and for a baseline tree (the commit
--baseline-ref, default d570a95, the server before issue 35), one after the other, with the ratio between them.

A model that answers at once leaves the server's own work alone: HTTP, the ASGI layers, routing, parsing and
checking the body, tokenising, batching, post-processing, rendering the answer. That work caps the requests/s of
any model, and for small fast models it is much of the time (issue 35: the distilled student is 1.99x its teacher
in forward passes but was 1.59-1.89x served).

The model: each tree's own `Predictor`, its `outputs()` answering zeros of the task's output shape at once;
tokenizer, task definition and post-processing are the real ones (by default the offline MiniLM's tokenizer, a
2-label SST-2 classifier reading 64 tokens, as recipes/quickstart.yaml trains; --model serves a trained model
folder's). Each tree is served by this script's launcher (--launch), run with PYTHONPATH at that tree, so it imports
that tree's `finetune` and `serving` (it checks it did) and runs that tree's `finetune serve` (`serving.cli.main`),
its model loader handing over the constant-time model: each tree runs with its own server, limits and uvicorn
settings, and nothing in the product knows about the bench. The baseline tree is `git archive REF` in a temporary
folder, run with this venv. The load generator is bench/serve.py's (aiohttp, closed loop, one SST-2 sentence per
request). Trees take turns within a round, and each level's figures are the medians of the rounds.

    python bench/serve_ceiling.py                      # this tree against d570a95: 16 and 64 clients, 20 s each, 3 rounds
    python bench/serve_ceiling.py --quick              # a smoke run (the test suite)
    python bench/serve_ceiling.py --baseline-ref HEAD --rounds 1 --duration 5
    python bench/serve_ceiling.py --no-baseline --concurrency 1,16,64

The issue's other serving target, the distilled student served against its teacher, is bench/distill.py's (it
serves both with bench/serve.py, taking turns): `python bench/distill.py --resume` reruns it in runs/bench-distill,
reading the finished training runs back and measuring the serving again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "d570a95"
CHECKPOINT = "sentence-transformers/all-MiniLM-L6-v2"
STUB_NAME = "constant-time"
MAX_LENGTH = 64  # recipes/quickstart.yaml's model.max_length


def constant_time_predictor(predictor_class: type, model_dir: str | None):
    """A `predictor_class` (the tree's `Predictor`) whose model answers at once: `outputs()` gives zeros of the
    task's output shape, the rest (tokenizer, task definition, post-processing) is the model's own."""
    import numpy as np

    class ConstantTime(predictor_class):
        def outputs(self, features):
            labels = self.model.config.num_labels
            if self.task.per_token:
                return [np.zeros((len(f["input_ids"]), labels), np.float32) for f in features]
            return [np.zeros(labels, np.float32) for _ in features]

    if model_dir:
        return ConstantTime.from_dir(model_dir)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from finetune.models.modeling import ModelInfo
    from finetune.models.pretrained import resolve_checkpoint

    transformers_logging.set_verbosity_error()  # the fresh head's "newly initialized" report means nothing here
    path = resolve_checkpoint(CHECKPOINT).path
    return ConstantTime(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                        AutoTokenizer.from_pretrained(path),
                        ModelInfo(task="classification", label_names=["negative", "positive"], text_pair=False,
                                  max_length=MAX_LENGTH))


def launch(tree: Path, model_dir: str | None, serve_args: list[str]) -> int:
    """In the server process: the tree's `finetune serve SERVE_ARGS` with the constant-time model."""
    import finetune
    import serving
    import serving.loading

    for package in (finetune, serving):
        if not Path(package.__file__).resolve().is_relative_to(tree.resolve()):
            print(f"error: {package.__name__} was imported from {package.__file__}, not from {tree}", file=sys.stderr)
            return 2
    from finetune.models.predictor import Predictor
    from serving.cli import main as serve_main

    loaded = serving.loading.LoadedModel(constant_time_predictor(Predictor, model_dir), STUB_NAME, "1", None,
                                         f"{model_dir or CHECKPOINT}, answering at once")
    # `finetune serve` imports its loader when it runs: handing it this model is the one thing changed.
    serving.loading.load_models = lambda *args, **kwargs: (loaded, {})
    return serve_main(serve_args)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_level(url: str, pid: int, sentences: list[str], clients: int, duration: float,
                        warmup: float) -> dict:
    """bench/serve.py's closed-loop load at `clients`, plus the server's CPU per request over the measured window."""
    from serve import run_load

    async def server_cpu() -> float | None:
        await asyncio.sleep(warmup)
        before = cpu_seconds(pid)
        await asyncio.sleep(duration)
        after = cpu_seconds(pid)
        return None if before is None or after is None else after - before

    result, cpu = await asyncio.gather(run_load(url, sentences, clients, duration, warmup), server_cpu())
    result["cpu_us_per_request"] = cpu / result["requests"] * 1e6 if cpu is not None and result["requests"] else None
    return result


def extract(ref: str, target: Path) -> str:
    """`git archive REF` unpacked into `target`; returns the commit's short id (SystemExit naming a bad REF)."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--short", f"{ref}^{{commit}}"], cwd=ROOT,
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"error: --baseline-ref {ref!r} is not a commit of this repository")
    target.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", found.stdout.strip()], cwd=ROOT, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait() != 0:
        raise SystemExit(f"error: git archive {ref} failed")
    return found.stdout.strip()


def serve_tree(tree: Path, args: argparse.Namespace, levels: list[int], sentences: list[str]) -> list[dict]:
    """Start the tree's server on the constant-time model, measure every level, stop it."""
    import httpx
    from serve import Server, free_port

    port = free_port()
    most = max(levels)
    # One load generator is one client address: it must be allowed as many connections as it opens.
    limits = ["--max-client-connections", str(most + 8), "--max-connections", str(max(128, most + 16))]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--launch", str(tree), *(["--model", args.model] if args.model else []),
           "--", "--port", str(port), *limits, *shlex.split(args.server_args)]
    # The tree's packages first; no API key from the environment (every request would get 401).
    server = Server(cmd, port, None, env={"PYTHONPATH": str(tree), "FINETUNE_API_KEY": "",
                                          "TOKENIZERS_PARALLELISM": "false"}, cwd=tree)
    try:
        server.start()
        answer = httpx.post(f"{server.url}/v1/predict", json={"inputs": [sentences[0]]}, timeout=30)
        if answer.status_code != 200 or answer.json().get("model") != STUB_NAME:
            raise RuntimeError(f"the server at {tree} did not answer with the constant-time model: {answer.text[:300]}")
        return [asyncio.run(measure_level(server.url, server.proc.pid, sentences, c, args.duration, args.warmup))
                for c in levels]
    finally:
        server.stop()


def medians(rounds: list[list[dict]]) -> list[dict]:
    """Level by level, the median of the rounds' figures (errors summed)."""
    out = []
    for level in zip(*rounds):
        cpu = [r["cpu_us_per_request"] for r in level if r["cpu_us_per_request"] is not None]
        out.append({"concurrency": level[0]["concurrency"], "rps": statistics.median(r["rps"] for r in level),
                    "p50_ms": statistics.median(r["p50_ms"] for r in level),
                    "p99_ms": statistics.median(r["p99_ms"] for r in level),
                    "cpu_us_per_request": statistics.median(cpu) if cpu else None,
                    "errors": sum(r["errors"] for r in level), "first_errors": level[0]["first_errors"]})
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (non-zero if any request failed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE,
                        help=f"the commit to compare with (default {DEFAULT_BASELINE}, before issue 35)")
    parser.add_argument("--no-baseline", action="store_true", help="measure this working tree alone")
    parser.add_argument("--concurrency", default="16,64", help="comma-separated client counts (default 16,64)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per level (default 20)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the trees taking turns; medians reported (default 3)")
    parser.add_argument("--model", help="a trained model folder whose tokenizer and task to serve (default: the offline "
                                        "MiniLM's tokenizer, a 2-label classifier)")
    parser.add_argument("--server-args", default="", help='extra arguments for finetune serve, e.g. "--max-wait-ms 2"')
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 and 16 clients, 1.5 s each, one round")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--launch", help=argparse.SUPPRESS)  # the server process: the tree to serve
    args, rest = parser.parse_known_args(argv)
    if args.launch:
        return launch(Path(args.launch), args.model, rest[1:] if rest[:1] == ["--"] else rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.quick:
        args.concurrency, args.duration, args.warmup, args.rounds = "4,16", 1.5, 0.5, 1
    levels = [int(c) for c in args.concurrency.split(",")]
    from machine_info import describe_machine
    from serve import load_sentences

    sentences = load_sentences()
    load_before = os.getloadavg()[0]
    results: dict[str, list[list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-ceiling-") as workdir:
        trees = {}
        if not args.no_baseline:
            commit = extract(args.baseline_ref, Path(workdir) / "baseline")
            trees[f"baseline {commit}"] = Path(workdir) / "baseline"
        trees["this tree"] = ROOT
        for _ in range(args.rounds):
            for name, tree in trees.items():
                results.setdefault(name, []).append(serve_tree(tree, args, levels, sentences))
    summary = {name: medians(rounds) for name, rounds in results.items()}

    info = describe_machine(("fastapi", "starlette", "uvicorn", "tokenizers"))
    print(f"machine: {info['cpu']}, {info['cores']} cores; python {info['python']}, fastapi {info['fastapi']}, "
          f"starlette {info['starlette']}, uvicorn {info['uvicorn']}, tokenizers {info['tokenizers']}; "
          f"load average before {load_before:.2f}")
    print(f"command: python {shlex.join(['bench/serve_ceiling.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(f"model: {args.model or CHECKPOINT + ' tokenizer, 2 labels'}, answering at once; one SST-2 sentence per request; "
          f"{args.duration:g} s per level after {args.warmup:g} s warm-up; medians of {args.rounds} round(s)\n")
    print(f"{'tree':<18} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} {'errors':>7}")
    for name, levels_out in summary.items():
        for r in levels_out:
            cpu = f"{r['cpu_us_per_request']:.0f}" if r["cpu_us_per_request"] is not None else "n/a"
            print(f"{name:<18} {r['concurrency']:>7} {r['rps']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {cpu:>11} "
                  f"{r['errors']:>7}")
    ratios = []
    if len(summary) == 2:
        base_name = next(iter(summary))
        print()
        for i, level in enumerate(levels):
            by_round = [ours[i]["rps"] / max(base[i]["rps"], 1e-9)
                        for ours, base in zip(results["this tree"], results[base_name])]
            ours, base = summary["this tree"][i], summary[base_name][i]
            ratio = {"concurrency": level, "throughput": statistics.median(by_round), "by_round": by_round,
                     "p99": ours["p99_ms"] / max(base["p99_ms"], 1e-9)}
            ratios.append(ratio)
            print(f"ratio at {level} clients: throughput {ratio['throughput']:.2f}x (by round: "
                  f"{', '.join(f'{x:.2f}x' for x in by_round)}), p99 {ratio['p99']:.2f}x (this tree / {base_name})")
    failures = [(name, r) for name, levels_out in summary.items() for r in levels_out if r["errors"]]
    for name, r in failures:
        print(f"errors from {name} at {r['concurrency']} clients, e.g. {r['first_errors']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": {**info, "load_before": load_before}, "args": vars(args),
                                               "rounds": results, "results": summary, "ratios": ratios}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
