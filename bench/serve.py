"""Serving benchmark: `finetune serve` on each backend against a naive transformers-pipeline FastAPI endpoint.

Servers: `baseline` (a `pipeline("text-classification")` called per request in a plain FastAPI endpoint),
and `finetune serve` with the `pytorch` (fp32, the default), `pytorch-bf16` (`--precision bf16`, on CPUs that
compute bf16 natively), `onnx` (ONNX Runtime fp32) and `onnx-int8` (dynamic int8) backends. All load the
same trained model (the ONNX ones its `finetune export`, made here if the folder has none) on the same
machine and face the same load: C concurrent clients in a closed loop, one real SST-2 sentence per request,
for a fixed time after a warm-up. Each server also answers the SST-2 dev sentences once, so every row
carries its accuracy. The servers run one after the other, never together, so they do not fight for the cores.

    python bench/serve.py                      # every server, concurrency 1 and 16, 20 s each
    python bench/serve.py --quick              # a smoke run (used by the test suite)
    python bench/serve.py --servers baseline,onnx-int8 --server-args "--max-wait-ms 10 --max-batch-size 64"
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import describe_machine
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "runs" / "quickstart" / "best"
# `finetune serve` arguments for each finetune server; the baseline is a separate script (below).
BACKENDS = {"pytorch": ["--backend", "torch"], "pytorch-bf16": ["--backend", "torch", "--precision", "bf16"],
            "onnx": ["--backend", "onnx"], "onnx-int8": ["--backend", "onnx-int8"]}
SERVERS = ("baseline", *BACKENDS)


def default_servers() -> list[str]:
    """Every server, but bf16 only on a CPU that computes it natively (elsewhere torch emulates it, slowly)."""
    from finetune.training.preflight import cpu_computes_bf16

    return [s for s in SERVERS if s != "pytorch-bf16" or cpu_computes_bf16()]


def load_labelled() -> list[tuple[str, str]]:
    """SST-2 dev (sentence, gold label) pairs: the full shared copy when present, else the one shipped in the repo."""
    shared = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
    path = shared if shared.exists() else ROOT / "data" / "sst2" / "dev.tsv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r["sentence"].strip(), r["label"].strip()) for r in rows if r["sentence"].strip()]


def load_sentences() -> list[str]:
    """SST-2 dev sentences (see `load_labelled`)."""
    return [text for text, _ in load_labelled()]


def onnx_folder(model_dir: str, int8: bool, workdir: Path) -> str:
    """A folder with the model's ONNX export: the model folder itself if it has one, else a fresh export.

    The fresh export skips the export's own parity check: every server's accuracy is measured here anyway.
    """
    from finetune.export.onnx import INT8_FILE, ONNX_FILE

    if (Path(model_dir) / ONNX_FILE).is_file() and (not int8 or (Path(model_dir) / INT8_FILE).is_file()):
        return model_dir
    target = workdir / "export"
    if not (target / (INT8_FILE if int8 else ONNX_FILE)).is_file():
        cmd = [str(Path(sys.executable).parent / "finetune"), "export", model_dir, str(target), "--no-check",
               *(["--quantize", "int8"] if int8 else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return str(target)


def measure_accuracy(url: str, labelled: list[tuple[str, str]], label_names: list[str] | None, chunk: int = 32) -> float | None:
    """Accuracy of a server's answers on labelled sentences (None when gold ids cannot be named)."""
    import httpx

    def name(gold: str) -> str:
        return label_names[int(gold)] if label_names and gold.isdigit() and int(gold) < len(label_names) else gold

    right = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, len(labelled), chunk):
            part = labelled[start : start + chunk]
            response = client.post("/v1/predict", json={"inputs": [text for text, _ in part]})
            response.raise_for_status()
            answers = response.json()["predictions"]
            right += sum(a.get("label") == name(gold) for a, (_, gold) in zip(answers, part))
    return right / len(labelled) if labelled else None


class BaselineRequest(BaseModel):
    # Module level: with postponed annotations FastAPI cannot resolve a class defined inside a function.
    inputs: list[str]


def baseline_server(model_dir: str, port: int, threads: int | None) -> None:
    """What a naive user writes: a pipeline called once per request in a plain (threadpool) endpoint."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    if threads:
        torch.set_num_threads(threads)
    # Truncate where our server does, so neither side does more work per sentence than the other.
    meta = Path(model_dir) / "finetune.json"
    max_length = json.loads(meta.read_text()).get("max_length", 512) if meta.exists() else 512
    pipe = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device="cpu")
    pipe("warm-up", truncation=True, max_length=max_length)

    app = FastAPI()

    @app.post("/v1/predict")
    def predict(body: BaselineRequest) -> dict:
        return {"predictions": pipe(body.inputs, truncation=True, max_length=max_length)}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    """A port free on loopback right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on loopback; `start` returns once /readyz answers 200."""

    def __init__(self, cmd: list[str], port: int, threads: int | None):
        self.cmd, self.port = cmd, port
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(os.environ)
        if threads:
            # `finetune serve` has no thread flag; torch sizes its intra-op pool from this variable.
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe, so a chatty server never blocks
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.log.seek(0)
        raise RuntimeError(f"server did not become ready: {shlex.join(self.cmd)}\n{self.log.read()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation, so p99 is a latency some request really had)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


async def run_load(url: str, sentences: list[str], concurrency: int, duration: float, warmup: float) -> dict:
    """Closed-loop load: each client sends its next sentence as soon as the previous answer arrives.

    aiohttp rather than httpx: the load generator shares the machine with the server under test, and
    httpx's AsyncClient costs about 1.9 ms of CPU per request here against aiohttp's 0.1 ms (measured
    against a trivial endpoint), which at 150 requests/s would take a sixth of the two cores.
    """
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        begin = time.perf_counter()
        measure_from, stop = begin + warmup, begin + warmup + duration
        last_end = measure_from

        async def client_loop(k: int) -> None:
            nonlocal last_end
            i = k * len(sentences) // concurrency  # offset so clients do not send the same sentence in lockstep
            while (sent := time.perf_counter()) < stop:
                try:
                    async with session.post("/v1/predict", json={"inputs": [sentences[i % len(sentences)]]}) as response:
                        text = await response.text()
                    error = None if response.status == 200 else f"HTTP {response.status}: {text[:200]}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    error = f"{type(e).__name__}: {e}"
                done = time.perf_counter()
                if sent >= measure_from:  # warm-up requests fill caches and connection pools; they do not count
                    if error is None:
                        latencies.append(done - sent)
                    else:
                        errors.append(error)
                    last_end = max(last_end, done)
                i += 1

        # A request in flight at the end may take up to the client timeout; nothing waits longer.
        await asyncio.wait_for(asyncio.gather(*(client_loop(k) for k in range(concurrency))), warmup + duration + 90)
    elapsed = max(last_end - measure_from, 1e-9)
    return {"concurrency": concurrency, "requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "errors": len(errors), "first_errors": errors[:3]}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (non-zero if any request failed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="trained model folder (default: runs/quickstart/best)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default 1,16)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per concurrency level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--quick", action="store_true", help="smoke run: concurrency 1,4 for 2 s after 0.5 s warm-up")
    parser.add_argument("--threads", type=int, help="torch threads for both servers (default: torch's own choice)")
    parser.add_argument("--servers", help=f"comma-separated servers from {','.join(SERVERS)} (default: all; "
                                           "pytorch-bf16 only where the CPU computes bf16)")
    parser.add_argument("--accuracy-sentences", type=int, help="dev sentences each server answers for its accuracy (default all)")
    parser.add_argument("--server-args", default="", help='extra arguments for finetune serve, e.g. "--max-wait-ms 10"')
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.baseline_server:
        baseline_server(args.model, args.port, args.threads)
        return 0
    if not (Path(args.model) / "config.json").exists():
        print(f"error: no trained model at {args.model}; run scripts/quickstart.sh first, or pass --model DIR",
              file=sys.stderr)
        return 2
    if args.quick:
        args.concurrency, args.duration, args.warmup = "1,4", 2.0, 0.5
        args.accuracy_sentences = args.accuracy_sentences or 64
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()] if args.servers else default_servers()
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        print(f"error: unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}", file=sys.stderr)
        return 2
    labelled = load_labelled()
    sentences = [text for text, _ in labelled]
    meta = Path(args.model) / "finetune.json"
    label_names = json.loads(meta.read_text()).get("label_names") if meta.exists() else None
    threads = ["--threads", str(args.threads)] if args.threads else []
    finetune_bin = Path(sys.executable).parent / "finetune"

    # Other work on the machine skews every figure; the load average before we start makes that visible.
    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {}
    accuracy: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
        for name in servers:
            port = free_port()
            if name == "baseline":
                cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-server", "--model", args.model,
                       "--port", str(port), *threads]
            else:
                onnx = name.startswith("onnx")
                source = onnx_folder(args.model, name == "onnx-int8", Path(workdir)) if onnx else args.model
                cmd = [str(finetune_bin), "serve", "--model", source, *BACKENDS[name], "--port", str(port),
                       *shlex.split(args.server_args)]
            server = Server(cmd, port, args.threads)
            try:
                server.start()
                results[name] = [asyncio.run(run_load(server.url, sentences, c, args.duration, args.warmup)) for c in levels]
                accuracy[name] = measure_accuracy(server.url, labelled[: args.accuracy_sentences], label_names)
            finally:
                server.stop()

    info = describe_machine(("torch", "transformers", "fastapi", "uvicorn"))
    print(f"machine: {info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
          f"transformers {info['transformers']}, threads {args.threads or 'default'}; load average before {load_before:.2f}")
    print(f"command: python {shlex.join(['bench/serve.py', *(argv if argv is not None else sys.argv[1:])])}")
    n_acc = len(labelled[: args.accuracy_sentences])
    print(f"model: {args.model}; {len(sentences)} SST-2 sentences; {args.duration:g} s per level after {args.warmup:g} s "
          f"warm-up; accuracy on {n_acc} dev sentences\n")
    print(f"{'server':<12} {'clients':>7} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} {'accuracy':>9}")
    for name in servers:
        acc = f"{accuracy[name]:.4f}" if accuracy.get(name) is not None else "n/a"
        for r in results[name]:
            print(f"{name:<12} {r['concurrency']:>7} {r['rps']:>9.1f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['errors']:>7} {acc:>9}")
    print()
    # Every backend against the baseline, and each faster one against the fp32 PyTorch default, level by level.
    pairs = [(n, "baseline") for n in BACKENDS if n in results and "baseline" in results]
    pairs += [(n, "pytorch") for n in BACKENDS if n != "pytorch" and {n, "pytorch"} <= set(results)]
    for ours_name, base_name in pairs:
        for ours, base in zip(results[ours_name], results[base_name]):
            print(f"ratio at {ours['concurrency']} clients: throughput {ours['rps'] / max(base['rps'], 1e-9):.2f}x, "
                  f"p99 {ours['p99_ms'] / max(base['p99_ms'], 1e-9):.2f}x ({ours_name} / {base_name})")
    failures = [(n, r) for n in servers for r in results[n] if r["errors"]]
    for name, r in failures:
        print(f"errors from {name} at {r['concurrency']} clients, e.g. {r['first_errors']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": {**info, "load_before": load_before}, "args": vars(args), "results": results,
                                               "accuracy": accuracy}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
