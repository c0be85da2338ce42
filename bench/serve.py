"""Serving benchmark: `finetune serve` on each backend against a naive transformers-pipeline FastAPI endpoint.

Servers: `baseline` (a `pipeline("text-classification")` called per request in a plain FastAPI endpoint),
and `finetune serve` with the `pytorch` (fp32, the default), `pytorch-bf16` (`--precision bf16`, on CPUs that
compute bf16 natively), `onnx` (ONNX Runtime fp32) and `onnx-int8` (dynamic int8) backends. All load the
same trained model (the ONNX ones its `finetune export`, made here if the folder has none) on the same
machine and face the same load: C concurrent clients in a closed loop, one real SST-2 sentence per request,
for a fixed time after a warm-up. Each server also answers the SST-2 dev sentences once, so every row
carries its accuracy. The servers run one after the other, never together, so they do not fight for the cores.
Right after each server says it is ready, it first answers --first-requests sentences one at a time, then the
same ones again: the cold / warm ratio is what a start (or a scale-up) costs its first users.

The peer: infinity-emb (michaelfeil/infinity), a CPU-capable serving project, as `infinity-torch`,
`infinity-optimum` (its ONNX Runtime engine, on the same fp32 export as `onnx`) and `infinity-optimum-int8` (the
same engine on the int8 export `onnx-int8` runs); each pair on one graph is reported as a ratio too. It runs from its own virtual
environment, made by bench/peers/setup_infinity.sh, and is in the default set only when that exists.

    python bench/serve.py                      # every server, concurrency 1 and 16, 20 s each
    python bench/serve.py --quick              # a smoke run (used by the test suite)
    python bench/serve.py --servers baseline,onnx-int8 --server-args "--max-wait-ms 10 --max-batch-size 64"
    python bench/serve.py --servers pytorch,infinity-torch,onnx,infinity-optimum --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from machine_info import describe_machine
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "runs" / "quickstart" / "best"
# `finetune serve` arguments for each finetune server; the baseline is a separate script (below).
BACKENDS = {"pytorch": ["--backend", "torch"], "pytorch-bf16": ["--backend", "torch", "--precision", "bf16"],
            "onnx": ["--backend", "onnx"], "onnx-int8": ["--backend", "onnx-int8"]}
# infinity-emb's engine for each peer server.
PEERS = {"infinity-torch": "torch", "infinity-optimum": "optimum", "infinity-optimum-int8": "optimum"}
# Each ONNX Runtime server of ours and infinity's optimum engine on the very same graph (issue 35).
SAME_GRAPH = {"onnx": "infinity-optimum", "onnx-int8": "infinity-optimum-int8"}
SERVERS = ("baseline", *BACKENDS, *PEERS)
PEER_SETUP = "bench/peers/setup_infinity.sh"


def infinity_venv() -> Path:
    """Where bench/peers/setup_infinity.sh makes infinity's virtual environment (INFINITY_VENV, as there)."""
    if os.environ.get("INFINITY_VENV"):
        return Path(os.environ["INFINITY_VENV"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "finetune-bench" / "infinity-venv"


def infinity_bin() -> Path | None:
    """infinity's server command in its venv, or None when the venv is not set up."""
    exe = infinity_venv() / "bin" / "infinity_emb"
    return exe if os.access(exe, os.X_OK) else None


def infinity_version() -> str:
    """The infinity-emb version installed in its venv (from the wheel's metadata folder name)."""
    found = sorted(infinity_venv().glob("lib/python*/site-packages/infinity_emb-*.dist-info"))
    return found[-1].name.split("-")[1].removesuffix(".dist") if found else "unknown"


def default_servers() -> list[str]:
    """Every server, but bf16 only on a CPU that computes it natively (elsewhere torch emulates it, slowly), and
    infinity's only when its venv is set up."""
    from finetune.training.preflight import cpu_computes_bf16

    return [s for s in SERVERS if (s != "pytorch-bf16" or cpu_computes_bf16()) and (s not in PEERS or infinity_bin())]


@dataclass(frozen=True)
class Api:
    """How a server is asked to classify sentences, where it says it is ready, and where the labels are."""

    path: str
    ready_path: str
    body: Callable[[list[str]], dict]
    labels: Callable[[dict], list[str]]


# `finetune serve` and the baseline.
OURS = Api("/v1/predict", "/readyz", lambda texts: {"inputs": texts},
           lambda answer: [p.get("label") for p in answer["predictions"]])


def peer_label(label: str, label_names: list[str] | None) -> str:
    """infinity's label in the model's label names.

    infinity names classes by the config's id2label: our models save their label names there, but a config
    without them says LABEL_<id>, which is mapped to the name here.
    """
    match = re.fullmatch(r"LABEL_(\d+)", label)
    if match and label_names and int(match.group(1)) < len(label_names):
        return label_names[int(match.group(1))]
    return label


def infinity_api(model: str, label_names: list[str] | None) -> Api:
    """infinity's classify endpoint: every class's score per input, in no order this code relies on."""
    def labels(answer: dict) -> list[str]:
        return [peer_label(max(scores, key=lambda s: s["score"])["label"], label_names) for scores in answer["data"]]

    return Api("/classify", "/health", lambda texts: {"input": texts, "model": model}, labels)


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


def infinity_folder(model_dir: str, server: str, workdir: Path) -> str:
    """The model folder as infinity is given it: links to the model's files in a folder of the bench's own.

    For the optimum engine it holds one ONNX export as the only `.onnx` file: infinity picks a file among all of a
    folder's `.onnx` files by name (preferring `*quantize*` on CPU, else `model.onnx`), so `infinity-optimum`
    gets the fp32 export as model.onnx and `infinity-optimum-int8` our int8 export as model_quantized.onnx: the
    same graphs our `onnx` and `onnx-int8` servers run. Nothing infinity writes (its optimised graph) can land in
    the user's model folder either.
    """
    from finetune.export.onnx import INT8_FILE, ONNX_FILE

    target = workdir / server
    target.mkdir()
    for entry in Path(model_dir).resolve().iterdir():
        if entry.suffix != ".onnx":
            (target / entry.name).symlink_to(entry)
    if PEERS[server] == "optimum":
        int8 = server.endswith("-int8")
        source = Path(onnx_folder(model_dir, int8, workdir)).resolve() / (INT8_FILE if int8 else ONNX_FILE)
        (target / ("model_quantized.onnx" if int8 else "model.onnx")).symlink_to(source)
    return str(target)


def infinity_command(engine: str, name: str, port: int, extra: list[str]) -> list[str]:
    """infinity's server on loopback, run in the model's folder (see below), serving it as `name`."""
    # The model as ".", the working directory: infinity 0.0.78 hands optimum the ONNX file's path as found in
    # the model folder, and optimum 2 (which pip picks for it) wants that name relative to the folder; with
    # "." the two agree. The torch engine keeps infinity's model warm-up (its default; our servers warm up
    # too). The optimum engine cannot: its pipeline does not truncate, and the warm-up's 512-token inputs (514
    # with [CLS] and [SEP]) overflow BERT's positions.
    warmup = ["--no-model-warmup"] if engine == "optimum" else []
    return [str(infinity_bin()), "v2", "--model-id", ".", "--served-model-name", name, "--engine", engine,
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *warmup, *extra]


def infinity_env(workdir: Path) -> dict[str, str]:
    """No hub, no telemetry, caches in the bench's folder, and nothing of our venv on its path."""
    return {"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(workdir / "infinity-hf"), "PYTHONPATH": ""}


def measure_accuracy(url: str, labelled: list[tuple[str, str]], label_names: list[str] | None, chunk: int = 32,
                     api: Api = OURS) -> float | None:
    """Accuracy of a server's answers on labelled sentences (None when gold ids cannot be named)."""
    import httpx

    def name(gold: str) -> str:
        return label_names[int(gold)] if label_names and gold.isdigit() and int(gold) < len(label_names) else gold

    right = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for start in range(0, len(labelled), chunk):
            part = labelled[start : start + chunk]
            response = client.post(api.path, json=api.body([text for text, _ in part]))
            response.raise_for_status()
            answers = api.labels(response.json())
            right += sum(a == name(gold) for a, (_, gold) in zip(answers, part))
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
    """A server subprocess on loopback; `start` returns once its readiness path answers 200."""

    def __init__(self, cmd: list[str], port: int, threads: int | None, ready_path: str = "/readyz",
                 env: dict[str, str] | None = None, cwd: str | Path = ROOT):
        self.cmd, self.port, self.ready_path, self.cwd = cmd, port, ready_path, cwd
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        if threads:
            # `finetune serve` has no thread flag; torch sizes its intra-op pool from this variable.
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe, so a chatty server never blocks
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
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


async def run_load(url: str, sentences: list[str], concurrency: int, duration: float, warmup: float,
                   api: Api = OURS) -> dict:
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
                    async with session.post(api.path, json=api.body([sentences[i % len(sentences)]])) as response:
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


async def first_requests(url: str, sentences: list[str], n: int, api: Api = OURS) -> dict:
    """The first `n` requests after readiness, one at a time, then the same `n` again.

    The same sentences twice, so the two passes see the same batch shapes: a CPU backend that sets kernels up per
    new shape (oneDNN's bf16 and AMX kernels do) is slow on the first pass only, and cold / warm shows what that
    costs the first users after a start or a scale-up (issue 20)."""
    import aiohttp

    passes: list[list[float]] = []
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=120)) as session:
        for _ in range(2):
            latencies = []
            for text in sentences[:n]:
                sent = time.perf_counter()
                async with session.post(api.path, json=api.body([text])) as response:
                    await response.read()
                    response.raise_for_status()
                latencies.append(time.perf_counter() - sent)
            passes.append(latencies)
    cold, warm = passes
    return {"requests": len(cold), "first_ms": cold[0] * 1000, "cold_mean_ms": statistics.fmean(cold) * 1000,
            "warm_mean_ms": statistics.fmean(warm) * 1000, "cold_p99_ms": percentile(cold, 99) * 1000,
            "warm_p99_ms": percentile(warm, 99) * 1000,
            "cold_over_warm": statistics.fmean(cold) / max(statistics.fmean(warm), 1e-9)}


def best_against_peer(results: dict[str, list[dict]]) -> list[dict]:
    """Level by level, the fastest finetune server against the fastest infinity server (empty without both)."""
    ours, peers = [n for n in BACKENDS if n in results], [n for n in PEERS if n in results]
    ratios = []
    for i in range(len(results[ours[0]]) if ours and peers else 0):
        best = max(ours, key=lambda n: results[n][i]["rps"])
        peer = max(peers, key=lambda n: results[n][i]["rps"])
        a, b = results[best][i], results[peer][i]
        ratios.append({"concurrency": a["concurrency"], "ours": best, "peer": peer, "ours_rps": a["rps"],
                       "peer_rps": b["rps"], "throughput_ratio": a["rps"] / max(b["rps"], 1e-9),
                       "p99_ratio": a["p99_ms"] / max(b["p99_ms"], 1e-9)})
    return ratios


def same_graph_ratios(results: dict[str, list[dict]]) -> list[dict]:
    """Level by level, each ONNX Runtime server of ours against infinity's optimum engine on the same graph
    (`SAME_GRAPH`), where both ran."""
    ratios = []
    for ours, peer in SAME_GRAPH.items():
        for a, b in zip(results.get(ours, []), results.get(peer, [])):
            ratios.append({"concurrency": a["concurrency"], "ours": ours, "peer": peer, "ours_rps": a["rps"],
                           "peer_rps": b["rps"], "throughput_ratio": a["rps"] / max(b["rps"], 1e-9),
                           "p99_ratio": a["p99_ms"] / max(b["p99_ms"], 1e-9)})
    return ratios


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (non-zero if any request failed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="trained model folder (default: runs/quickstart/best)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default 1,16)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per concurrency level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--quick", action="store_true", help="smoke run: concurrency 1,4 for 2 s after 0.5 s warm-up")
    parser.add_argument("--threads", type=int, help="torch threads for every server (default: torch's own choice)")
    parser.add_argument("--servers", help=f"comma-separated servers from {','.join(SERVERS)} (default: all; "
                                           "pytorch-bf16 only where the CPU computes bf16, infinity-* only where "
                                           f"{PEER_SETUP} made infinity's venv)")
    parser.add_argument("--first-requests", type=int, default=100,
                        help="requests sent one at a time right after readiness, then again, to show any warm-up "
                             "cost (default 100; 0 skips)")
    parser.add_argument("--accuracy-sentences", type=int, help="dev sentences each server answers for its accuracy (default all)")
    parser.add_argument("--server-args", default="", help='extra arguments for finetune serve, e.g. "--max-wait-ms 10"')
    parser.add_argument("--infinity-args", default="", help='extra arguments for infinity_emb v2, e.g. "--batch-size 16"')
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.baseline_server:
        baseline_server(args.model, args.port, args.threads)
        return 0
    servers = [s.strip() for s in args.servers.split(",") if s.strip()] if args.servers else default_servers()
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        print(f"error: unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}", file=sys.stderr)
        return 2
    peers = [s for s in servers if s in PEERS]
    if peers and infinity_bin() is None:
        print(f"error: the infinity servers ({', '.join(peers)}) run infinity-emb from its own virtual environment, "
              f"and there is none at {infinity_venv()}; run {PEER_SETUP} first (INFINITY_VENV sets where, for both)",
              file=sys.stderr)
        return 2
    if not (Path(args.model) / "config.json").exists():
        print(f"error: no trained model at {args.model}; run scripts/quickstart.sh first, or pass --model DIR",
              file=sys.stderr)
        return 2
    if args.quick:
        args.concurrency, args.duration, args.warmup = "1,4", 2.0, 0.5
        args.first_requests = min(args.first_requests, 8)
        args.accuracy_sentences = args.accuracy_sentences or 64
    levels = [int(c) for c in args.concurrency.split(",")]
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
    first: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
        for name in servers:
            port, api, env, cwd = free_port(), OURS, None, ROOT
            if name == "baseline":
                cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-server", "--model", args.model,
                       "--port", str(port), *threads]
            elif name in PEERS:
                cwd = infinity_folder(args.model, name, Path(workdir))
                cmd = infinity_command(PEERS[name], name, port, shlex.split(args.infinity_args))
                api, env = infinity_api(name, label_names), infinity_env(Path(workdir))
            else:
                onnx = name.startswith("onnx")
                source = onnx_folder(args.model, name == "onnx-int8", Path(workdir)) if onnx else args.model
                cmd = [str(finetune_bin), "serve", "--model", source, *BACKENDS[name], "--port", str(port),
                       *shlex.split(args.server_args)]
            server = Server(cmd, port, args.threads, api.ready_path, env, cwd)
            try:
                server.start()
                if args.first_requests:
                    first[name] = asyncio.run(first_requests(server.url, sentences, args.first_requests, api))
                results[name] = [asyncio.run(run_load(server.url, sentences, c, args.duration, args.warmup, api))
                                 for c in levels]
                accuracy[name] = measure_accuracy(server.url, labelled[: args.accuracy_sentences], label_names, api=api)
            finally:
                server.stop()

    info = describe_machine(("torch", "transformers", "fastapi", "uvicorn"))
    if peers:
        info["infinity-emb"] = infinity_version()
    print(f"machine: {info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
          f"transformers {info['transformers']}, threads {args.threads or 'default'}; load average before {load_before:.2f}"
          + (f"; infinity-emb {info['infinity-emb']} (its own venv)" if peers else ""))
    print(f"command: python {shlex.join(['bench/serve.py', *(argv if argv is not None else sys.argv[1:])])}")
    n_acc = len(labelled[: args.accuracy_sentences])
    print(f"model: {args.model}; {len(sentences)} SST-2 sentences; {args.duration:g} s per level after {args.warmup:g} s "
          f"warm-up; accuracy on {n_acc} dev sentences\n")
    print(f"{'server':<16} {'clients':>7} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} {'accuracy':>9}")
    for name in servers:
        acc = f"{accuracy[name]:.4f}" if accuracy.get(name) is not None else "n/a"
        for r in results[name]:
            print(f"{name:<16} {r['concurrency']:>7} {r['rps']:>9.1f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['errors']:>7} {acc:>9}")
    if first:
        n = next(iter(first.values()))["requests"]
        print(f"\nthe first {n} requests after /readyz, one at a time (cold), then the same {n} again (warm):")
        print(f"{'server':<16} {'first ms':>9} {'cold mean':>10} {'warm mean':>10} {'cold p99':>9} {'warm p99':>9} "
              f"{'cold/warm':>10}")
        for name, f in first.items():
            print(f"{name:<16} {f['first_ms']:>9.1f} {f['cold_mean_ms']:>10.1f} {f['warm_mean_ms']:>10.1f} "
                  f"{f['cold_p99_ms']:>9.1f} {f['warm_p99_ms']:>9.1f} {f['cold_over_warm']:>9.2f}x")
    print()
    # Every backend against the baseline, and each faster one against the fp32 PyTorch default, level by level.
    pairs = [(n, "baseline") for n in BACKENDS if n in results and "baseline" in results]
    pairs += [(n, "pytorch") for n in BACKENDS if n != "pytorch" and {n, "pytorch"} <= set(results)]
    for ours_name, base_name in pairs:
        for ours, base in zip(results[ours_name], results[base_name]):
            print(f"ratio at {ours['concurrency']} clients: throughput {ours['rps'] / max(base['rps'], 1e-9):.2f}x, "
                  f"p99 {ours['p99_ms'] / max(base['p99_ms'], 1e-9):.2f}x ({ours_name} / {base_name})")
    peer_ratios = best_against_peer(results)
    for r in peer_ratios:
        print(f"finetune best / infinity best at {r['concurrency']} clients: throughput {r['throughput_ratio']:.2f}x, "
              f"p99 {r['p99_ratio']:.2f}x ({r['ours']} {r['ours_rps']:.1f} / {r['peer']} {r['peer_rps']:.1f} req/s)")
    same_graph = same_graph_ratios(results)
    for r in same_graph:
        print(f"same ONNX graph at {r['concurrency']} clients: throughput {r['throughput_ratio']:.2f}x, p99 "
              f"{r['p99_ratio']:.2f}x ({r['ours']} {r['ours_rps']:.1f} / {r['peer']} {r['peer_rps']:.1f} req/s; "
              "target >= 1.2x)")
    failures = [(n, r) for n in servers for r in results[n] if r["errors"]]
    for name, r in failures:
        print(f"errors from {name} at {r['concurrency']} clients, e.g. {r['first_errors']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": {**info, "load_before": load_before}, "args": vars(args), "results": results,
                                               "accuracy": accuracy, "peer_ratios": peer_ratios, "same_graph_ratios": same_graph,
                                               "first_requests": first},
                                              indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
