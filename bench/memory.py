"""Memory benchmark: the peak resident memory of `finetune run` on shipped offline recipes, under /usr/bin/time -v.

Each recipe runs in a fresh process with a fresh cache and output folder, once per padding multiple given, so
the table shows what `model.pad_to_multiple_of` does to the peak (PyTorch's CPU allocator goes through glibc
malloc, which keeps blocks of every batch shape it has seen; fewer shapes, fewer odd-sized blocks kept). Extra
overrides (e.g. training.max_steps=300 for a first look) apply to every run; the evaluation's metric is
reported beside the peak so a memory saving that cost accuracy shows.

    python bench/memory.py recipes/offline/squadshifts-minilm.yaml --multiples 1,16
    python bench/memory.py recipes/offline/*.yaml                    # every shipped offline recipe, defaults
    python bench/memory.py recipes/offline/squadshifts-minilm.yaml --multiples 1,16 training.max_steps=300
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def peak_of(recipe: str, multiple: int | None, overrides: list[str], workdir: Path) -> dict:
    """Run one recipe under /usr/bin/time -v; return its peak RSS, wall time and best metrics."""
    out = workdir / f"run-{Path(recipe).stem}-{multiple}"
    extra = [f"output_dir={out}", "tracking.log_model=false", "tracking.system_metrics=false", *overrides]
    if multiple is not None:
        extra.append(f"model.pad_to_multiple_of={multiple}")
    env_cmd = ["env", f"MLFLOW_TRACKING_URI=sqlite:///{workdir / 'mlflow.db'}", f"FINETUNE_CACHE_DIR={out}-cache"]
    cmd = ["/usr/bin/time", "-v", *env_cmd, sys.executable, "-m", "finetune", "run", recipe, *extra, "--overwrite"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{recipe} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    info = json.loads((out / "best" / "finetune.json").read_text())
    return {"recipe": recipe, "pad_to_multiple_of": multiple, "overrides": overrides, "peak_gib": peak_kb / 2**20, "wall_s": wall,
            "metrics": info.get("metrics", {}), "test_metrics": _test_metrics(workdir / "mlflow.db")}


def _test_metrics(store: Path) -> dict[str, float]:
    """The `test/*` metrics of the latest run in the store: the recipe's test split, scored once with the best model
    (finetune.json keeps only the split that chose it, and the store goes with the temporary folder)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not runs:
        return {}
    return {k.removeprefix("test/"): v for k, v in runs[0].data.metrics.items() if k.startswith("test/")}


def main(argv: list[str] | None = None) -> int:
    """Run the recipes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="recipe files; KEY=VALUE arguments are overrides for every run")
    parser.add_argument("--multiples", help="comma-separated model.pad_to_multiple_of values (default: the recipe's)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_intermixed_args(argv)  # overrides may come after the options, as in the examples above
    recipes = [r for r in args.recipes if "=" not in r]
    overrides = [r for r in args.recipes if "=" in r]
    multiples = [int(m) for m in args.multiples.split(",")] if args.multiples else [None]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for recipe in recipes:
            for multiple in multiples:
                rows.append(peak_of(recipe, multiple, overrides, Path(tmp)))
                r = rows[-1]
                shown = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items() if k != "loss")
                if r["test_metrics"]:
                    shown += "; test: " + ", ".join(f"{k} {v:.4f}" for k, v in r["test_metrics"].items() if k != "loss")
                print(f"{recipe} pad_to_multiple_of={multiple or 'default'}: peak {r['peak_gib']:.2f} GiB, "
                      f"{r['wall_s']:.0f} s; {shown}", flush=True)
    machine = describe_machine(["torch", "transformers"])
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} CPUs; {time.strftime('%Y-%m-%d')}; overrides: "
          f"{' '.join(overrides) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "overrides": overrides, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
