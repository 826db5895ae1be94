"""Export's stage watch and the export memory benchmark: which stage ran, and what it held.

The memory goals themselves are benchmark figures (benchmarks/RESULTS.md), not tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sdrt.export.stages import StageWatch, peak_bytes, rss_bytes

MIB = 2**20


def test_rss_and_peak_are_read_from_the_process():
    now, peak = rss_bytes(), peak_bytes()
    assert 0 < now <= peak


def test_a_stage_that_allocates_records_the_process_high_water_mark():
    watch = StageWatch()
    before = peak_bytes()
    size = before + 64 * MIB  # past the high-water mark, so this stage sets a new one
    with watch.stage("unet", "trace"):
        block = np.ones(size // 8, dtype=np.float64)  # touched, so resident
        del block
    with watch.stage("unet", "write"):
        pass
    trace, write = watch.records
    assert (trace.component, trace.stage, trace.exact) == ("unet", "trace", True)
    assert trace.peak_bytes >= size
    # the next stage allocated nothing: its peak is what was resident, far below
    assert not write.exact and write.peak_bytes < trace.peak_bytes - 32 * MIB
    assert watch.component_peaks() == {"unet": trace.peak_bytes}


def test_the_watch_reports_each_stage_start_with_the_rss():
    seen = []
    watch = StageWatch(on_change=lambda *args: seen.append(args))
    with watch.for_component("vae_decoder")("verify"):
        pass
    component, stage, rss = seen[0]
    assert (component, stage) == ("vae_decoder", "verify") and rss > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "tiny.json"
    command = [sys.executable, "-m", "sdrt.benchmarks.export_memory", "tiny"]
    done = subprocess.run(
        [*command, "--json", str(out), "--progress"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done


def test_benchmark_reports_every_stage_of_every_component(tiny_run):
    result, done = tiny_run
    stages = {(r["component"], r["stage"]) for r in result["stages"]}
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert {(component, s) for s in ("trace", "write", "verify")} <= stages
    assert ("pipeline", "load") in stages
    peaks = result["component_peaks"]
    for component, peak in peaks.items():
        own = [r["peak_bytes"] for r in result["stages"] if r["component"] == component]
        assert peak == max(own)
    assert result["peak_rss_bytes"] >= max(peaks.values()) > result["start_rss_bytes"] > 0
    assert "| unet | verify |" in done.stdout and "process peak RSS" in done.stdout


def test_progress_bar_shows_the_stage_and_rss(tiny_run):
    _, done = tiny_run
    assert "unet: trace, RSS" in done.stderr and "vae_encoder: verify, RSS" in done.stderr
