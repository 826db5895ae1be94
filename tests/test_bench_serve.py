"""`sdrt bench-serve` end to end on the tiny bundle with tiny settings: every mode measured
against a started server over interleaved rounds, reports written, figures consistent with
each other; and how rounds pool into one load point."""

from __future__ import annotations

import json
import statistics

import pytest

from sdrt.benchmarks.serve_load import Sample, paired_ratios, round_orders, summarize
from sdrt.cli import main


def test_bench_serve_compares_the_three_modes_against_the_bound(tiny_bundle, tmp_path):
    out = tmp_path / "report"
    argv = [
        "bench-serve",
        str(tiny_bundle),
        "--requests",
        "2",
        "--rounds",
        "2",
        "--concurrency",
        "1,2",
        "--steps",
        "2,3",
        "--rate",
        "20",
        "--max-batch-rows",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads((out / "bench-serve.json").read_text())
    assert [m["mode"] for m in result["modes"]] == ["none", "request", "continuous"]
    # --modes' order (--rate is given, so continuous need not set it), then reversed
    assert [r["order"] for r in result["rounds"]] == [
        ["none", "request", "continuous"],
        ["continuous", "request", "none"],
    ]
    for mode in result["modes"]:
        points = [*mode["closed"], mode["poisson"]]
        assert [p["clients"] for p in mode["closed"]] == [1, 2]
        for point in points:
            assert point["errors"] == 0 and point["requests"] == 4  # 2 rounds of 2
            assert len(point["requests_per_s_rounds"]) == 2
            assert point["requests_per_s"] == statistics.median(point["requests_per_s_rounds"])
            assert point["latency_ms"]["p50"] <= point["latency_ms"]["p99"]
            assert point["first_step_ms"]["p50"] <= point["latency_ms"]["p99"]
            assert 1 <= point["mean_rows_per_call"] <= 4
    none = result["modes"][0]
    assert all(p["mean_rows_per_call"] <= 2 for p in none["closed"])  # one request at a time
    assert result["bound"]["bound"] > 0 and 0 < result["bookkeeping"]["share"] < 1
    assert set(result["targets"]) == {
        "continuous_over_none",
        "p99_continuous_vs_request",
        "bookkeeping_share",
        "continuous_at_one_client",
    }
    one_client = result["targets"]["continuous_at_one_client"]
    assert set(one_client) == {"none", "request", "target"}
    continuous, none = (result["modes"][i]["closed"][0]["requests_per_s_rounds"] for i in (2, 0))
    paired = [c / n for c, n in zip(continuous, none, strict=True)]  # round by round
    assert one_client["none"]["rounds"] == pytest.approx(paired)
    markdown = (out / "bench-serve.md").read_text()
    assert markdown.count("| continuous |") == 3 and "of the" in markdown
    assert "2 rounds, the modes interleaved" in markdown and "at one client" in markdown
    low, high = sorted(result["modes"][2]["closed"][0]["requests_per_s_rounds"])
    assert f"({low:.2f}-{high:.2f})" in markdown  # the spread over rounds
    assert (out / "bench-serve.png").read_bytes()[:4] == b"\x89PNG"


def _sample(latencies_ms, seconds, calls, rows, ok=True):
    records = [
        {"ok": ok, "latency_ms": ms, "first_step_ms": ms / 10, "images": 1} for ms in latencies_ms
    ]
    return Sample(records, seconds, {"calls": calls, "rows": rows, "requests": calls})


def test_rounds_pool_requests_and_report_the_median_rate_and_every_rounds_rate():
    point = summarize(
        [
            _sample([100, 300], 1.0, calls=10, rows=20),
            _sample([200], 2.0, calls=30, rows=120),
            _sample([400, 500, 600, 700], 1.0, calls=0, rows=0),
        ],
        clients=1,
        rate=0.0,
    )
    assert point["requests_per_s_rounds"] == [2.0, 0.5, 4.0]
    assert point["requests_per_s"] == 2.0  # the median round, not the pooled 7 / 4 s
    assert point["requests"] == 7 and point["seconds"] == 4.0
    assert point["latencies_ms"] == [100, 200, 300, 400, 500, 600, 700]
    assert point["latency_ms"]["p50"] == 400
    assert point["mean_rows_per_call"] == 140 / 40  # weighted by each round's calls


def test_failed_requests_count_as_errors_not_as_throughput():
    point = summarize([_sample([100], 1.0, 1, 2), _sample([100, 100], 1.0, 0, 0, ok=False)])
    assert point["errors"] == 2 and point["requests_per_s_rounds"] == [1.0, 0.0]
    assert point["latencies_ms"] == [100]


def test_rounds_alternate_the_order_of_the_modes():
    assert round_orders(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    assert round_orders(["a"], 1) == [["a"]]


def test_one_client_ratio_is_the_median_of_the_paired_rounds():
    pairs = paired_ratios([9.0, 10.0, 8.0], [10.0, 10.0, 10.0])
    assert pairs == {"ratio": 0.9, "rounds": [0.9, 1.0, 0.8]}
