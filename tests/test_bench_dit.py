"""`sdrt bench` on diffusion transformers: eager diffusers and ONNX Runtime measured per stage
(text encoders, one transformer step, VAE decode) on the same latents, and the same image."""

from __future__ import annotations

import pytest
from test_bench import QUICK, bench_args, paths_by_status

from sdrt.benchmarks.cli import run_bench
from sdrt.benchmarks.harness import STAGES


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_transformer_bench_measures_every_stage_and_matches_eager(tmp_path, preset):
    args = bench_args(
        *QUICK, "--random-weights", preset, "--scheduler", "flow_match_euler",
        "--guidance", "3.5", "--batch-sizes", "1", "--out", str(tmp_path),
    )  # fmt: skip
    result = run_bench(args, report=lambda line: None)
    measured = paths_by_status(result, "ok")
    assert set(measured) == {"eager", "sdrt_onnxruntime"}
    for path in measured.values():
        for stage in STAGES:
            assert path["stages_ms"][stage]["p50"] > 0, (path["name"], stage)
    # SD3 doubles its rows for guidance; Flux-dev takes the scale as an input
    assert result["workload"]["unet_batch"] == (2 if preset == "tiny-sd3" else 1)
    # measured 3.6e-6 (SD3) and 2.0e-6 (Flux) on the 2-core CPU machine
    assert measured["sdrt_onnxruntime"]["diff_vs_eager"]["max_abs"] <= 1e-5
