"""`sdrt bench-serve` end to end on the tiny bundle with tiny settings: every mode measured
against a started server, reports written, figures consistent with each other."""

from __future__ import annotations

import json

from sdrt.cli import main


def test_bench_serve_compares_the_three_modes_against_the_bound(tiny_bundle, tmp_path):
    out = tmp_path / "report"
    argv = [
        "bench-serve",
        str(tiny_bundle),
        "--requests",
        "4",
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
    for mode in result["modes"]:
        points = [*mode["closed"], mode["poisson"]]
        assert [p["clients"] for p in mode["closed"]] == [1, 2]
        for point in points:
            assert point["errors"] == 0 and point["requests"] == 4
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
    }
    markdown = (out / "bench-serve.md").read_text()
    assert markdown.count("| continuous |") == 3 and "of the" in markdown
    assert (out / "bench-serve.png").read_bytes()[:4] == b"\x89PNG"
