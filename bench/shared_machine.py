"""Shared-machine benchmark: servers and training on a quiet machine and with one CPU taken by another process.

The neighbour is built in and bounded: one Python busy loop that stops by itself after the measurement (and
is killed when it ends), the kind of load a second job, a noisy container or a build puts on a shared host.
Each target runs in two thread set-ups, side by side in the same script:

  before  what torch chooses alone, and the project did before issue 20: a thread per CPU, fixed
          (FINETUNE_THREADS=<cpus>);
  now     finetune's default: threads sized to the CPUs this process may use and lowered while other
          processes keep cores busy (finetune.threads).

Servers (`finetune serve` on each backend, the same model and closed-loop load as bench/serve.py: 16 clients,
one SST-2 sentence per request) get their neighbour after /readyz, so the threads must adapt while serving.
Training (`finetune` on the quickstart recipe's data, fixed steps) runs alone with the neighbour, and two
trainings run at once on the two cores. Target (issue 20): with one of two cores taken, keep >= 40% of the
quiet throughput (the physical share is 50%), and no slower than before on a quiet machine.

    python bench/shared_machine.py                        # every server and training, 20 s per measurement
    python bench/shared_machine.py --servers pytorch --no-training
    python bench/shared_machine.py --quick                # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import describe_machine
from serve import BACKENDS, DEFAULT_MODEL, ROOT, Server, default_servers, free_port, load_sentences, onnx_folder, run_load

SETUPS = ("before", "now")
NEIGHBOUR = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def setup_env(setup: str) -> dict[str, str]:
    """The environment of a target process for a thread set-up (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FINETUNE_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                            "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if setup == "before":
        env.update(FINETUNE_THREADS=str(len(os.sched_getaffinity(0))))
    return env


@contextlib.contextmanager
def neighbour(active: bool, seconds: float):
    """A busy loop in another process for at most `seconds` (nothing when not `active`)."""
    if not active:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR.format(seconds=seconds)])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def measure_server(name: str, model: str, setup: str, busy: bool, args, sentences: list[str], workdir: Path) -> dict:
    """Requests/s of one `finetune serve` backend at the bench's concurrency, quiet or with the neighbour."""
    folder = model if name.startswith("pytorch") else onnx_folder(model, name == "onnx-int8", workdir)
    port = free_port()
    cmd = [sys.executable, "-m", "finetune", "serve", "--model", folder, "--port", str(port), *BACKENDS[name]]
    server = Server(cmd, port, None)
    server.env = setup_env(setup)
    server.start()
    try:
        # The neighbour starts after the server is ready: the server cannot see it coming at start-up.
        with neighbour(busy, args.warmup + args.duration + 30):
            result = asyncio.run(run_load(server.url, sentences, args.concurrency, args.duration, args.warmup))
    finally:
        server.stop()
    if result["errors"]:
        raise RuntimeError(f"{name} ({setup}, {'busy' if busy else 'quiet'}): {result['first_errors']}")
    return {"rps": result["rps"], "p99_ms": result["p99_ms"]}


def training_recipe(workdir: Path, steps: int, name: str) -> Path:
    """The quickstart recipe's model and data, fixed steps, no evaluation until the end, nothing logged."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    recipe["name"] = name
    recipe["output_dir"] = str(workdir / name)
    recipe["data"]["files"] = {k: str(ROOT / v) for k, v in recipe["data"]["files"].items()}
    recipe["training"].update(max_steps=steps, logging_steps=steps)
    recipe["tracking"] = {"log_model": False, "system_metrics": False}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def training_worker(recipe_path: str, out: str) -> int:
    """In a fresh process (the OpenMP settings are read once, at load): train and write samples/s."""
    from finetune.config.recipe import load_recipe
    from finetune.training import train

    recipe = load_recipe(recipe_path)
    result = train.main(recipe, overwrite=True)
    samples = result.steps * recipe.training.batch_size
    Path(out).write_text(json.dumps({"samples_per_second": samples / result.train_seconds, "steps": result.steps}))
    return 0


def measure_training(setup: str, condition: str, steps: int, workdir: Path) -> dict:
    """Training samples/s: alone (`quiet`), with the neighbour (`busy`), or two trainings at once (`two`)."""
    work = Path(tempfile.mkdtemp(dir=workdir))
    count = 2 if condition == "two" else 1
    procs = []
    with neighbour(condition == "busy", 3600):
        for k in range(count):
            # A store each: two processes creating one SQLite store at once race on its tables.
            env = setup_env(setup) | {"MLFLOW_TRACKING_URI": f"sqlite:///{work / f'mlflow-{k}.db'}",
                                      "FINETUNE_CACHE_DIR": str(workdir / "cache")}
            path, out = training_recipe(work, steps, f"train-{k}"), work / f"result-{k}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--train-worker", str(path), "--out", str(out)]
            procs.append((subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True), out))
        for proc, _ in procs:
            output, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"training ({setup}, {condition}) failed:\n{output[-3000:]}")
    rates = [json.loads(out.read_text())["samples_per_second"] for _, out in procs]
    return {"samples_per_second": min(rates), "each": rates}


def warm_training_cache(workdir: Path) -> None:
    """Tokenise once before measuring, so no measurement pays for building the cache."""
    measure_training("now", "quiet", 2, workdir)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print and optionally save the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="trained model folder (default: runs/quickstart/best)")
    parser.add_argument("--servers", help="comma-separated backends (default: pytorch, pytorch-bf16 where the CPU computes "
                                          "bf16, onnx, onnx-int8)")
    parser.add_argument("--no-training", action="store_true", help="servers only")
    parser.add_argument("--no-servers", action="store_true", help="training only")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per server measurement")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring (the threads adapt)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per training measurement")
    parser.add_argument("--quick", action="store_true", help="smoke run: pytorch only, 3 s, 6 training steps")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_worker:
        return training_worker(args.train_worker, args.out)
    if args.quick:
        args.servers, args.duration, args.warmup, args.steps = args.servers or "pytorch", 3.0, 2.0, 6
    if len(os.sched_getaffinity(0)) < 2:
        print("error: the busy neighbour takes one CPU: this needs at least two", file=sys.stderr)
        return 2
    servers = args.servers.split(",") if args.servers else [s for s in default_servers() if s != "baseline"]
    servers = [] if args.no_servers else servers
    if servers and not (Path(args.model) / "config.json").exists():
        print(f"error: no trained model at {args.model}; run scripts/quickstart.sh first, or pass --model DIR", file=sys.stderr)
        return 2
    sentences = load_sentences()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in servers:
            for setup in SETUPS:
                quiet = measure_server(name, args.model, setup, False, args, sentences, workdir)
                busy = measure_server(name, args.model, setup, True, args, sentences, workdir)
                rows.append({"target": f"serve {name}", "setup": setup, "unit": "requests/s", "quiet": quiet["rps"],
                             "busy": busy["rps"], "busy_p99_ms": busy["p99_ms"], "quiet_p99_ms": quiet["p99_ms"]})
                print(_line(rows[-1]), flush=True)
        if not args.no_training:
            warm_training_cache(workdir)
            for setup in SETUPS:
                quiet = measure_training(setup, "quiet", args.steps, workdir)
                busy = measure_training(setup, "busy", args.steps, workdir)
                two = measure_training(setup, "two", args.steps, workdir)
                rows.append({"target": "training", "setup": setup, "unit": "samples/s", "quiet": quiet["samples_per_second"],
                             "busy": busy["samples_per_second"], "two_at_once": two["samples_per_second"],
                             "two_each": two["each"]})
                print(_line(rows[-1]), flush=True)
    machine = describe_machine(["torch", "onnxruntime"])
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} CPUs; {time.strftime('%Y-%m-%d')}")
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))
    return 0


def _line(row: dict) -> str:
    two = f", two at once {row['two_at_once']:.1f} each ({row['two_at_once'] / row['quiet']:.0%})" if "two_at_once" in row else ""
    return (f"{row['target']} ({row['setup']}): quiet {row['quiet']:.1f} {row['unit']}, one core taken {row['busy']:.1f} "
            f"({row['busy'] / row['quiet']:.0%}){two}")


def _table(rows: list[dict]) -> str:
    lines = ["| target | threads | quiet | one core taken | kept | two at once (each) | kept |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        two = (f"{r['two_at_once']:.1f} | {r['two_at_once'] / r['quiet']:.0%}" if "two_at_once" in r else "- | -")
        lines.append(f"| {r['target']} ({r['unit']}) | {r['setup']} | {r['quiet']:.1f} | {r['busy']:.1f} | "
                     f"{r['busy'] / r['quiet']:.0%} | {two} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
