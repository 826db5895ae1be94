"""The cold-start benchmark runs fresh processes and reports every part of the load (its
figures are a benchmark's, not a test's: nothing here is timed)."""

from __future__ import annotations

import json

from sdrt.benchmarks.cold_start import main


def test_cold_start_reports_import_load_and_each_part(tiny_bundle, tmp_path, capsys):
    out, cache = tmp_path / "cold.json", tmp_path / "cache"
    args = [str(tiny_bundle), "--threads", "1", "--json", str(out), "--graph-cache", str(cache)]
    assert main([*args, "--runs", "2"]) == 0
    result = json.loads(out.read_text())
    first, second = result["runs"]
    components = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    for run in (first, second):
        assert list(run["load_ms"]) == ["bundle", "verify", *components, "total"]
        assert run["import_s"] > 0 and run["load_s"] > 0 and run["max_rss_mib"] > 0 < run["cpu_s"]
    # an empty cache: the first process optimizes and stores, the second loads what it stored
    assert statuses(first) == {"stored"} and statuses(second) == {"hit"}
    assert len(list(cache.iterdir())) == len(components)
    assert (result["threads"], result["verify"]) == (1, True)
    table = capsys.readouterr().out
    assert "| 2 | hit |" in table and "unet ms" in table
    assert main([*args[:-1], "off", "--runs", "1", "--no-verify"]) == 0
    (uncached,) = json.loads(out.read_text())["runs"]
    assert statuses(uncached) == {"off"}


def statuses(run: dict) -> set[str]:
    return {s for component in run["graph_cache"].values() for s in component.values()}


def test_cold_start_refuses_a_bundle_that_does_not_load(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--runs", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
