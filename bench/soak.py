"""Soak test of the HTTP service: sustained mixed load, then a verdict.

    python bench/soak.py [--model runs/quickstart/best] [--duration 300] [--concurrency 32] [--quick]

Starts `finetune serve` on a free loopback port, warms it up, then runs `--concurrency` clients in closed
loops for `--duration` seconds, sending a mix of valid requests (SST-2 sentences, some batched, some pairs
of options) and invalid ones (bad JSON, wrong types, empty text, too many inputs, oversized bodies). It
checks that no response is a 5xx, that every valid request is answered with the same label the model gives
the sentence on its own, and that the server's resident memory grows by less than 10% after warm-up.
Exit status 0 only when all three hold.
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
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "runs" / "quickstart" / "best"))
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--quick", action="store_true", help="15 s at concurrency 8 (the test suite runs this)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.concurrency, args.warmup = 15, 8, 3
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
    server = subprocess.Popen([sys.executable, "-m", "finetune", "serve", "--model", args.model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
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

        async def run(seconds: float) -> None:
            stop_at = time.monotonic() + seconds
            await asyncio.gather(*[_client(i, url, sentences, expected, stop_at, stats, failures)
                                   for i in range(args.concurrency)])

        asyncio.run(run(args.warmup))
        rss_after_warmup = _rss_mb(server.pid)
        stats.clear()
        started = time.monotonic()
        asyncio.run(run(args.duration))
        elapsed = time.monotonic() - started
        rss_end = _rss_mb(server.pid)
        alive = httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    growth = (rss_end - rss_after_warmup) / rss_after_warmup
    total = sum(stats.values())
    fivexx = sum(n for k, n in stats.items() if k.split()[1].startswith("5"))
    print(f"soak: {elapsed:.0f} s at concurrency {args.concurrency}, {total} requests ({total / elapsed:.1f}/s)")
    for key, n in sorted(stats.items()):
        print(f"  {key}: {n}")
    print(f"  5xx: {fivexx}; wrong or failed answers: {len(failures)}")
    print(f"  server RSS after warm-up {rss_after_warmup:.0f} MB, at the end {rss_end:.0f} MB ({growth:+.1%})")
    for failure in failures[:10]:
        print(f"  FAIL {failure}")
    ok = alive and not failures and fivexx == 0 and growth < 0.10
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
