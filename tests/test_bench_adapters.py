"""`bench/adapters.py --quick` runs end to end on a tiny base: three adapters trained, the plain export, one adapter
and the three together served, the three also peft's way (no figure is asserted: benchmarks are not tests; that the
three share passes is, since the bench refuses to report otherwise)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_bench, run_bench

pytestmark = pytest.mark.e2e


def test_quick_adapters_benchmark_serves_plain_one_and_three_sharing(tmp_path, monkeypatch, capsys):
    report = tmp_path / "bench.json"
    code, out, err = run_bench("adapters", ["--quick", "--json", str(report)], monkeypatch, capsys)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "command: python bench/adapters.py --quick" in out and "machine:" in out and "date:" in out
    assert "| server | clients | req/s | p50 ms | p99 ms | errors | RSS after start-up MB |" in out
    for server in ("plain", "one-adapter", "mixed", "mixed-peft"):
        assert f"| {server} | 6 |" in out, out
    assert "mixed / plain throughput: " in out and "memory per extra adapter: " in out
    saved = json.loads(report.read_text())
    per = saved["results"]["mixed"]["per_adapter"]
    assert set(per) == {"a", "b", "c"} and all(p["requests"] > 0 and p["errors"] == 0 for p in per.values())
    assert set(saved["rss_mb"]) == {"plain", "one-adapter", "mixed", "mixed-peft"} and saved["mixed_over_plain"] > 0
    assert saved["mixed_over_mixed_peft"] > 0 and "mixed / mixed-peft (the stacked update" in out


def test_sixteen_clients_spread_six_five_five(monkeypatch):
    bench = load_bench("adapters", monkeypatch)
    assert bench.spread(16, ("a", "b", "c")) == {"a": 6, "b": 5, "c": 5}
    assert bench.spread(2, ("a", "b", "c")) == {"a": 1, "b": 1, "c": 0}


def test_each_server_reports_its_median_round_with_that_rounds_latencies(monkeypatch):
    bench = load_bench("adapters", monkeypatch)
    rounds = [{"rps": 90.0, "p99_ms": 300.0}, {"rps": 120.0, "p99_ms": 150.0}, {"rps": 100.0, "p99_ms": 210.0}]
    assert bench.median_round(rounds) == {"rps": 100.0, "p99_ms": 210.0}
    assert bench.median_round(rounds[:1]) == rounds[0]
