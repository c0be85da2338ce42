"""Soak test of the HTTP service: sustained mixed load, then a verdict.

    python bench/soak.py [--model runs/quickstart/best] [--duration 300] [--concurrency 32] [--quick]

Starts `finetune serve` on a free loopback port, warms it up, then runs `--concurrency` clients in closed
loops for `--duration` seconds, sending a mix of valid requests (SST-2 sentences, some batched, some pairs
of options) and invalid ones (bad JSON, wrong types, empty text, too many inputs, oversized bodies). Beside
them run hostile clients: ones that disconnect (halfway through a body, or right after sending it), slow ones
(a request head or a body trickled a few bytes at a time, which the server must cut off with 408), and ones
sending ~1 MB bodies of long strings (ten texts of ~95,000 characters, answered; one of 950,000, refused
with 422 before tokenising). A prober times GET /healthz ten times a second throughout.

Verdict: no response is a 5xx, and the server's /metrics counts none either (disconnects are 499s); every
valid request is answered with the same label the model gives the sentence on its own; the slow clients
were cut off; /healthz p99 is under 1 s; the server's resident memory grows by less than 10% after warm-up.
Exit status 0 only when all hold. `--quick` (10 s at concurrency 8) runs the server with 2 s header and
3 s body deadlines so that the slow clients are cut several times; the full soak uses the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HEALTHZ_P99_LIMIT_S = 1.0
LONG_TEXT = "the film is a gripping and beautiful one, if far too long " * 1640  # ~95,000 characters


def _sentences() -> list[str]:
    shared = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
    path = shared if shared.is_file() else ROOT / "data" / "sst2" / "dev.tsv"
    with open(path, encoding="utf-8") as f:
        return [row["sentence"].strip() for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _invalid_requests(rng: random.Random) -> tuple[bytes, dict]:
    choices = [
        (b"{not json", {}),
        (json.dumps({"inputs": [1, 2]}).encode(), {}),
        (json.dumps({"inputs": [""]}).encode(), {}),
        (json.dumps({"inputs": ["x"] * 500}).encode(), {}),
        (json.dumps({"inputs": ["x"], "options": {"top_k": -1}}).encode(), {}),
        (json.dumps({"text": "no inputs"}).encode(), {}),
        (b"x" * 1_100_000, {}),
        (bytes(rng.randrange(256) for _ in range(200)), {}),
    ]
    return rng.choice(choices)


async def _client(index: int, url: str, sentences: list[str], expected: dict[str, str], stop_at: float, stats: Counter,
                  failures: list[str]) -> None:
    rng = random.Random(index)
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < stop_at:
            if rng.random() < 0.25:
                body, _ = _invalid_requests(rng)
                response = await client.post(f"{url}/v1/predict", content=body)
                stats[f"invalid {response.status_code}"] += 1
                if response.status_code >= 500 or response.status_code < 400:
                    failures.append(f"invalid request answered {response.status_code}: {response.text[:200]}")
                continue
            batch = rng.sample(sentences, rng.choice([1, 1, 1, 4, 16]))
            response = await client.post(f"{url}/v1/predict", json={"inputs": batch, "options": {"top_k": 2}})
            stats[f"valid {response.status_code}"] += 1
            if response.status_code != 200:
                failures.append(f"valid request answered {response.status_code}: {response.text[:200]}")
                continue
            for text, answer in zip(batch, response.json()["predictions"]):
                if answer["label"] != expected[text]:
                    failures.append(f"wrong label for {text[:60]!r}: {answer['label']} != {expected[text]}")


async def _raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def _status(data: bytes) -> str:
    return data[9:12].decode("latin-1") if data.startswith(b"HTTP/1.") else "closed"


async def _disconnecting(index: int, port: int, stop_at: float, stats: Counter) -> None:
    """Send a request and leave: halfway through its body, or right after it (while it is being answered)."""
    rng = random.Random(1000 + index)
    body = json.dumps({"inputs": [LONG_TEXT[:20_000]] * 4}).encode()
    head = f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    while time.monotonic() < stop_at:
        _, writer = await _raw(port)
        mid_body = rng.random() < 0.5
        writer.write(head + (body[: len(body) // 2] if mid_body else body))
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.transport.abort()
        stats["disconnect mid-body" if mid_body else "disconnect after the body"] += 1
        await asyncio.sleep(0.2)


async def _slow(kind: str, port: int, stop_at: float, limit_s: float, stats: Counter, failures: list[str]) -> None:
    """Trickle a request head (kind "head") or body ("body") a few bytes every 0.25 s until the server cuts
    the connection off; it must, with 408, within `limit_s`."""
    head = f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    while time.monotonic() < stop_at:
        reader, writer = await _raw(port)
        started = time.monotonic()
        answer = b""
        try:
            writer.write((head + ("Content-Length: 100000\r\n\r\n" if kind == "body" else "")).encode())
            while time.monotonic() - started < limit_s:
                writer.write(b"X-Slow: 1\r\n" if kind == "head" else b"0123456789")
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(65536), 0.25)
                except asyncio.TimeoutError:
                    continue
                break
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()
        if time.monotonic() >= stop_at and not answer:
            break  # the soak ended first
        status = _status(answer)
        stats[f"slow {kind} {status}"] += 1
        if status != "408":
            failures.append(f"slow {kind} client: {status} after {time.monotonic() - started:.1f} s, not 408")


async def _large(index: int, url: str, stop_at: float, stats: Counter, failures: list[str]) -> None:
    """~1 MB bodies: ten long texts (answered, truncated), or one text over the character budget (422)."""
    near_limit = json.dumps({"inputs": [LONG_TEXT] * 10}).encode()
    over_budget = json.dumps({"inputs": ["word " * 190_000]}).encode()
    rng = random.Random(2000 + index)
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < stop_at:
            valid = rng.random() < 0.5
            response = await client.post(f"{url}/v1/predict", content=near_limit if valid else over_budget)
            stats[f"large {response.status_code}"] += 1
            want = 200 if valid else 422
            if response.status_code != want:
                failures.append(f"large {'valid' if valid else 'over-budget'} request answered "
                                f"{response.status_code}, not {want}: {response.text[:200]}")
            elif valid and [p["truncated"] for p in response.json()["predictions"]] != [True] * 10:
                failures.append("large valid request: not ten truncated answers")


def _prober(url: str, stop: threading.Event, latencies: list[float], failures: list[str]) -> None:
    """GET /healthz every 0.1 s, timed, from a thread of its own (the clients' event loop must not delay it)."""
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = client.get(f"{url}/healthz").status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            latencies.append(time.perf_counter() - started)
            if status != 200:
                failures.append(f"/healthz answered {status}")
            stop.wait(0.1)


def _server_statuses(url: str) -> Counter:
    """Requests the server counted, by status (its /metrics)."""
    counts: Counter = Counter()
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("finetune_requests_total{"):
            series, value = line.rsplit(" ", 1)
            counts[series.split('status="')[1].split('"')[0]] += int(float(value))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "runs" / "quickstart" / "best"))
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--quick", action="store_true", help="10 s at concurrency 8 (the test suite runs this)")
    parser.add_argument("--hostile", type=int, default=2,
                        help="clients of each hostile kind (disconnecting, slow head, slow body, large strings)")
    args = parser.parse_args()
    server_args: list[str] = []
    header_timeout, body_timeout = 10.0, 30.0  # the server's defaults
    if args.quick:
        args.duration, args.concurrency, args.warmup = 10, 8, 2
        header_timeout, body_timeout = 2.0, 3.0
        server_args = ["--header-timeout", str(header_timeout), "--body-timeout", str(body_timeout)]
    if not Path(args.model).is_dir():
        sys.exit(f"no model at {args.model}: run scripts/quickstart.sh first, or pass --model")

    sys.path.insert(0, str(ROOT))
    from finetune.models.predictor import Predictor

    sentences = _sentences()
    predictor = Predictor.from_dir(args.model)
    # Reference answers, each sentence alone: the server must give the same label whatever it is batched with.
    expected = {s: a["label"] for s, a in zip(sentences, predictor.predict(sentences))}
    del predictor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FINETUNE_API_KEY": ""}
    server = subprocess.Popen([sys.executable, "-m", "finetune", "serve", "--model", args.model, "--port", str(port),
                               *server_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.5)
        stats: Counter = Counter()
        failures: list[str] = []
        latencies: list[float] = []

        async def run(seconds: float) -> None:
            stop_at = time.monotonic() + seconds
            clients = [_client(i, url, sentences, expected, stop_at, stats, failures) for i in range(args.concurrency)]
            for i in range(args.hostile):
                clients += [_disconnecting(i, port, stop_at, stats),
                            _slow("head", port, stop_at, header_timeout + 5, stats, failures),
                            _slow("body", port, stop_at, body_timeout + 5, stats, failures),
                            _large(i, url, stop_at, stats, failures)]
            await asyncio.gather(*clients)

        def probed(seconds: float) -> None:
            stop = threading.Event()
            prober = threading.Thread(target=_prober, args=(url, stop, latencies, failures))
            prober.start()
            try:
                asyncio.run(run(seconds))
            finally:
                stop.set()
                prober.join()

        probed(args.warmup)
        rss_after_warmup = _rss_mb(server.pid)
        stats.clear()
        latencies.clear()
        before = _server_statuses(url)
        started = time.monotonic()
        probed(args.duration)
        elapsed = time.monotonic() - started
        rss_end = _rss_mb(server.pid)
        counted = _server_statuses(url) - before
        alive = httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    growth = (rss_end - rss_after_warmup) / rss_after_warmup
    total = sum(stats.values())
    fivexx = sum(n for k, n in stats.items() if k.split()[-1].startswith("5"))
    server_fivexx = sum(n for status, n in counted.items() if status.startswith("5"))
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("inf")
    print(f"soak: {elapsed:.0f} s at concurrency {args.concurrency} plus {args.hostile} hostile clients of each kind, "
          f"{total} requests ({total / elapsed:.1f}/s)")
    for key, n in sorted(stats.items()):
        print(f"  {key}: {n}")
    print(f"  5xx: {fivexx}; wrong or failed answers: {len(failures)}")
    print(f"  server counted: {server_fivexx} 5xx, {counted['499']} 499 (client gone), {counted['408']} 408, "
          f"{counted['413']} 413, {counted['422']} 422")
    print(f"  /healthz: {len(latencies)} probes, p99 {p99:.3f} s, max {max(latencies, default=float('inf')):.3f} s "
          f"(limit p99 {HEALTHZ_P99_LIMIT_S:.0f} s)")
    print(f"  server RSS after warm-up {rss_after_warmup:.0f} MB, at the end {rss_end:.0f} MB ({growth:+.1%})")
    kinds = ["disconnect mid-body", "disconnect after the body", "slow head 408", "slow body 408", "large 200", "large 422"]
    missing = [k for k in kinds if not stats[k]] if args.hostile else []
    if missing:
        failures.append(f"hostile clients that never completed a round: {', '.join(missing)}")
    for failure in failures[:10]:
        print(f"  FAIL {failure}")
    ok = (alive and not failures and fivexx == 0 and server_fivexx == 0 and p99 < HEALTHZ_P99_LIMIT_S
          and growth < 0.10)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
