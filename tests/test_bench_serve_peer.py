"""bench/serve.py's infinity peer, without infinity installed: which servers run by default, the error when its
venv is missing, and whole runs against a stand-in `infinity_emb` that speaks infinity's /health and /classify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, load_bench

# A stand-in for infinity's server: the command line bench/serve.py gives it, infinity's protocol (GET /health,
# POST /classify with {"input": [...], "model": ...} answered with every class's score per input, here not
# sorted by score), and a refusal (exit 3) of anything the bench must not do to the real one.
FAKE_INFINITY = textwrap.dedent('''
    import argparse, json, os, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["v2"])
    for flag in ("--model-id", "--served-model-name", "--engine", "--device", "--host", "--port", "--log-level"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--no-model-warmup", action="store_true")
    args = parser.parse_args()
    folder = Path(args.model_id).resolve()
    problems = []
    if os.environ.get("DO_NOT_TRACK") != "1" or os.environ.get("INFINITY_ANONYMOUS_USAGE_STATS") != "0":
        problems.append("telemetry not turned off")
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        problems.append("hub not offline")
    if args.engine not in ("torch", "optimum") or args.device != "cpu" or args.host != "127.0.0.1":
        problems.append(f"engine {args.engine}, device {args.device}, host {args.host}")
    if args.engine == "optimum" and not args.no_model_warmup:
        problems.append("the optimum engine's warm-up overflows BERT's 512 positions")
    if not (folder / "config.json").is_file():
        problems.append("no config.json in the model folder")
    onnx = sorted(p.name for p in folder.glob("*.onnx"))
    if args.engine == "optimum" and (len(onnx) != 1 or onnx[0] not in ("model.onnx", "model_quantized.onnx")
                                     or not (folder / onnx[0]).is_file()):
        problems.append(f"optimum needs one graph, model.onnx or model_quantized.onnx, got {onnx}")
    with open(os.environ["FAKE_INFINITY_LOG"], "a") as log:
        log.write(json.dumps({"engine": args.engine, "folder": str(folder), "name": args.served_model_name,
                              "onnx": onnx, "threads": os.environ.get("OMP_NUM_THREADS"),
                              "pythonpath": os.environ.get("PYTHONPATH"), "problems": problems}) + "\\n")
    if problems:
        sys.exit("refused: " + "; ".join(problems))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.answer(200, {"unix": time.time()}) if self.path == "/health" else self.answer(404, {})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            texts = body.get("input")
            if self.path != "/classify" or body.get("model") != args.served_model_name or not (
                    isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
                return self.answer(400, {"error": f"bad request to {self.path}: {body}"})
            # "Positive" for every sentence: the bench's accuracy must then be the share of gold 1s.
            scores = [{"score": 0.2, "label": "LABEL_0"}, {"score": 0.8, "label": "LABEL_1"}]
            self.answer(200, {"object": "classify", "data": [scores for _ in texts], "model": args.served_model_name,
                              "usage": {"prompt_tokens": 1, "total_tokens": 1}})

        def log_message(self, *a):
            pass

    ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()
''')


def load_serve(monkeypatch):
    """bench/serve.py as a module."""
    return load_bench("serve", monkeypatch)


def fake_venv(root: Path) -> Path:
    exe = root / "bin" / "infinity_emb"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!{sys.executable}\n{FAKE_INFINITY}")
    exe.chmod(0o755)
    return root


def fake_model(root: Path) -> Path:
    """A model folder with what the bench reads before it starts infinity: config, label names, ONNX files."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}))
    (root / "finetune.json").write_text(json.dumps({"label_names": ["negative", "positive"]}))
    (root / "model.onnx").write_bytes(b"fp32 stand-in")
    (root / "model.int8.onnx").write_bytes(b"int8 stand-in")
    return root


def test_infinity_is_in_the_default_set_only_when_its_venv_exists(monkeypatch, tmp_path):
    serve = load_serve(monkeypatch)
    monkeypatch.delenv("INFINITY_VENV", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert serve.infinity_venv() == tmp_path / "cache" / "finetune-bench" / "infinity-venv"  # the script's default
    assert not set(serve.PEERS) & set(serve.default_servers())
    from finetune.training.preflight import cpu_computes_bf16

    # Every backend of ours, bf16 only on a CPU that computes it (tests/test_bench_serve.py runs three of them).
    assert serve.default_servers() == ["baseline", "pytorch", *(["pytorch-bf16"] if cpu_computes_bf16() else []),
                                       "onnx", "onnx-int8"]
    monkeypatch.setenv("INFINITY_VENV", str(fake_venv(tmp_path / "venv")))
    assert {"infinity-torch", "infinity-optimum", "pytorch", "onnx"} <= set(serve.default_servers())


def test_naming_infinity_without_its_venv_says_to_run_the_setup_script(tmp_path):
    env = {**os.environ, "INFINITY_VENV": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--servers", "pytorch,infinity-optimum",
                           "--model", str(tmp_path / "no-model")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "(infinity-optimum)" in done.stderr and "run bench/peers/setup_infinity.sh first" in done.stderr
    assert str(tmp_path / "none") in done.stderr and "pytorch" not in done.stderr


def test_peer_labels_and_the_best_against_best_ratio(monkeypatch):
    serve = load_serve(monkeypatch)
    names = ["negative", "positive"]
    assert [serve.peer_label(x, names) for x in ("LABEL_1", "LABEL_0", "positive", "LABEL_7")] == [
        "positive", "negative", "positive", "LABEL_7"]
    api = serve.infinity_api("m", names)
    assert api.body(["a b"]) == {"input": ["a b"], "model": "m"}
    answer = {"data": [[{"score": 0.3, "label": "LABEL_1"}, {"score": 0.7, "label": "LABEL_0"}],
                       [{"score": 0.9, "label": "positive"}, {"score": 0.1, "label": "negative"}]]}
    assert api.labels(answer) == ["negative", "positive"]

    def row(c, rps, p99):
        return {"concurrency": c, "rps": rps, "p99_ms": p99}

    results = {"pytorch": [row(1, 50, 30), row(16, 120, 200)], "onnx-int8": [row(1, 80, 15), row(16, 300, 80)],
               "baseline": [row(1, 90, 10), row(16, 400, 10)],  # not ours: never the "finetune best"
               "infinity-torch": [row(1, 40, 40), row(16, 150, 160)], "infinity-optimum": [row(1, 60, 20), row(16, 100, 90)]}
    ratios = serve.best_against_peer(results)
    assert [(r["concurrency"], r["ours"], r["peer"]) for r in ratios] == [
        (1, "onnx-int8", "infinity-optimum"), (16, "onnx-int8", "infinity-torch")]
    assert ratios[1]["throughput_ratio"] == pytest.approx(2.0) and ratios[1]["p99_ratio"] == pytest.approx(0.5)
    assert serve.best_against_peer({k: v for k, v in results.items() if not k.startswith("infinity")}) == []

    # Same graph: each ONNX Runtime server of ours against infinity's optimum engine on that graph, where both ran.
    results |= {"onnx": [row(1, 70, 15), row(16, 150, 100)]}
    same = serve.same_graph_ratios(results)
    assert [(r["concurrency"], r["ours"], r["peer"]) for r in same] == [(1, "onnx", "infinity-optimum"),
                                                                       (16, "onnx", "infinity-optimum")]
    assert same[1]["throughput_ratio"] == pytest.approx(1.5)
    results |= {"infinity-optimum-int8": [row(1, 40, 20), row(16, 200, 90)]}
    assert [r["throughput_ratio"] for r in serve.same_graph_ratios(results) if r["ours"] == "onnx-int8"] == [2.0, 1.5]


def test_a_run_against_a_stand_in_infinity(monkeypatch, tmp_path):
    """Both peer servers start from the venv, face the load and answer the accuracy set through /classify; the
    optimum one gets a folder of its own holding the fp32 export alone; the thread budget reaches them."""
    serve = load_serve(monkeypatch)
    model, log, report = fake_model(tmp_path / "model"), tmp_path / "infinity.log", tmp_path / "bench.json"
    env = {**os.environ, "INFINITY_VENV": str(fake_venv(tmp_path / "venv")), "FAKE_INFINITY_LOG": str(log)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--servers", "infinity-torch,infinity-optimum,infinity-optimum-int8",
         "--model", str(model), "--concurrency", "1,3", "--duration", "0.5", "--warmup", "0.2",
         "--accuracy-sentences", "40", "--threads", "1", "--first-requests", "3", "--json", str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    started = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["engine"] for s in started] == ["torch", "optimum", "optimum"] and not any(s["problems"] for s in started)
    assert all(s["threads"] == "1" and not s["pythonpath"] for s in started)
    assert [s["name"] for s in started] == ["infinity-torch", "infinity-optimum", "infinity-optimum-int8"]
    assert [s["onnx"] for s in started] == [[], ["model.onnx"], ["model_quantized.onnx"]]  # our fp32 and int8 graphs
    assert all(Path(s["folder"]) != model.resolve() for s in started)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "finetune.json", "model.int8.onnx", "model.onnx"]

    saved = json.loads(report.read_text())
    gold = [label for _, label in serve.load_labelled()[:40]]
    peers = ("infinity-torch", "infinity-optimum", "infinity-optimum-int8")
    assert saved["accuracy"] == {name: pytest.approx(gold.count("1") / 40) for name in peers}
    for name in peers:
        assert [r["concurrency"] for r in saved["results"][name]] == [1, 3]
        assert all(r["requests"] > 0 and r["errors"] == 0 for r in saved["results"][name])
        table = done.stdout.split("\nthe first")[0]  # the load table, before the first-requests one
        assert {row.split()[1] for row in table.splitlines() if row.startswith(name + " ")} == {"1", "3"}
        assert saved["first_requests"][name]["requests"] == 3
    assert "infinity-emb unknown (its own venv)" in done.stdout and saved["peer_ratios"] == []
