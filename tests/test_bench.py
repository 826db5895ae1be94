"""`sdrt bench` measures every path the same way and writes JSON, Markdown and a PNG chart."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types

import pytest

from sdrt.benchmarks.cli import add_options, main, run_bench
from sdrt.benchmarks.harness import STAGES, loop_overhead, percentiles, time_calls
from sdrt.benchmarks.memory import NvmlDeviceUse
from sdrt.benchmarks.report import markdown
from sdrt.benchmarks.settings import parse_batch_sizes, resolve_settings
from sdrt.errors import UserError

QUICK = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--iterations", "2"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One full run on the tiny model: export, eager, ONNX Runtime CPU; progress collected."""
    out = tmp_path_factory.mktemp("bench")
    progress: list[str] = []
    args = bench_args(*QUICK, "--batch-sizes", "1,2", "--out", str(out))
    result = run_bench(args, report=progress.append)
    return result, out, progress


def paths_by_status(result, status):
    return {p["name"]: p for p in result["paths"] if p["status"] == status}


def test_json_on_disk_is_the_result_returned_and_records_how_it_was_made(bench):
    result, out, _ = bench
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["schema"] == "sdrt-bench/1" and on_disk["complete"] is True
    assert on_disk["machine"]["device"] == "cpu" and on_disk["machine"]["device_name"]
    for package in ("sdrt", "torch", "diffusers", "onnxruntime"):
        assert on_disk["versions"][package], package
    assert on_disk["date"] and on_disk["command"]
    assert on_disk["settings"]["steps"] == 2 and on_disk["settings"]["height"] == 64
    assert on_disk["workload"]["guided"] and on_disk["workload"]["unet_batch"] == 2
    assert [p["name"] for p in on_disk["paths"]] == [p["name"] for p in result["paths"]]


def test_eager_and_onnxruntime_are_measured_and_tensorrt_skipped_with_a_reason_on_cpu(bench):
    result, _, _ = bench
    assert set(paths_by_status(result, "ok")) == {"eager", "sdrt_onnxruntime"}
    skipped = paths_by_status(result, "skipped")
    assert skipped["sdrt_tensorrt"]["reason"]
    assert "torch_compile" not in {p["name"] for p in result["paths"]}  # off by default on cpu


def test_every_stage_and_batch_has_ordered_positive_percentiles(bench):
    result, _, _ = bench
    for path in paths_by_status(result, "ok").values():
        figures = [path["stages_ms"][stage] for stage in STAGES] + [path["end_to_end_ms"]]
        figures += [t["end_to_end_ms"] for t in path["throughput"]]
        for f in figures:
            assert 0 < f["p50"] <= f["p90"] <= f["p99"], (path["name"], f)
        assert [t["batch_size"] for t in path["throughput"]] == [1, 2]
        for t in path["throughput"]:  # images/s is the batch over its p50, not another clock
            assert t["images_per_s"] == pytest.approx(
                t["batch_size"] * 1e3 / t["end_to_end_ms"]["p50"], rel=1e-9
            )
        assert path["first_call_ms"] > 0
        assert path["memory"]["peak_bytes"] > 0 and "process-wide" in path["memory"]["method"]


def test_sdrt_matches_eager_on_the_same_latents_and_reports_build_and_loop_overhead(bench):
    result, _, _ = bench
    sdrt = paths_by_status(result, "ok")["sdrt_onnxruntime"]
    # measured 1.5e-6, PSNR 132.6 dB (benchmarks/RESULTS.md)
    assert sdrt["diff_vs_eager"]["max_abs"] <= 1e-5 and sdrt["diff_vs_eager"]["psnr_db"] > 100
    eager = paths_by_status(result, "ok")["eager"]
    assert sdrt["speedup_vs_eager"] == pytest.approx(
        eager["end_to_end_ms"]["p50"] / sdrt["end_to_end_ms"]["p50"], rel=1e-9
    )
    assert eager["speedup_vs_eager"] == 1.0
    assert sdrt["build_s"] > 0 and sdrt["build_s"] == result["bundle"]["export_s"]
    assert sdrt["load_s"] > 0
    overhead = sdrt["loop_overhead"]
    assert 0 < overhead["ms"] < sdrt["end_to_end_ms"]["p99"]
    assert 0 < overhead["percent"] < 100
    assert sdrt["details"]["provider"] == ["CPUExecutionProvider"]


def test_markdown_has_a_row_per_measured_path_and_says_cpu_timings_are_relative(bench):
    result, out, _ = bench
    text = (out / "bench.md").read_text()
    for name in ("eager", "sdrt_onnxruntime"):
        assert sum(line.startswith(f"| {name} |") for line in text.splitlines()) == 2, name
    assert "relative comparison" in text
    assert "sdrt_tensorrt (skipped)" in text


def test_markdown_warns_that_a_stochastic_scheduler_makes_the_diff_meaningless(bench):
    result, _, _ = bench
    assert "fresh noise" not in markdown(result)
    stochastic = {**result, "workload": {**result["workload"], "stochastic_scheduler": True}}
    assert "fresh noise every step" in markdown(stochastic)


def test_chart_is_a_png(bench):
    _, out, _ = bench
    assert (out / "bench.png").read_bytes()[:8] == PNG_SIGNATURE


def test_progress_names_each_path_as_it_runs(bench):
    _, _, progress = bench
    assert any(m.startswith("eager") for m in progress)
    assert any(m.startswith("sdrt_onnxruntime") for m in progress)
    assert any("end to end" in m for m in progress)


def test_a_given_bundle_is_reused_instead_of_exported(tiny_model_dir, tiny_bundle, tmp_path):
    args = bench_args(
        str(tiny_model_dir),
        *QUICK,
        "--bundle",
        str(tiny_bundle),
        "--batch-sizes",
        "1",
        "--backends",
        "onnxruntime",
        "--out",
        str(tmp_path),
    )
    result = run_bench(args, report=lambda message: None)
    sdrt = paths_by_status(result, "ok")["sdrt_onnxruntime"]
    assert sdrt["build_s"] is None and result["bundle"]["path"] == str(tiny_bundle)
    assert sdrt["diff_vs_eager"]["max_abs"] <= 1e-5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bench-bundle")]


def test_a_bundle_of_another_architecture_is_refused_naming_each_difference(
    preset_bundle, tmp_path, capsys
):
    _, sdxl = preset_bundle("tiny-sdxl")
    argv = ["--random-weights", "tiny", *QUICK, "--bundle", str(sdxl), "--out", str(tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sdrt: error: --bundle {sdxl} was not exported from the model benchmarked: "
        "text encoders text_encoder+text_encoder_2 in the bundle, text_encoder in random "
        "weights: tiny; text width 64 in the bundle, 32 in random weights: tiny; pass the "
        "bundle exported from this model, or leave out --bundle to export one"
    )
    assert not (tmp_path / "bench.json").exists()  # refused before any row was measured


def test_unknown_preset_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    code = main(["--random-weights", "no-such-preset", *QUICK, "--out", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith("sdrt: error:") and "no-such-preset" in error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-sizes", "4,x"], "--batch-sizes"),
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--steps", "0"], "--steps"),
        (["--iterations", "0"], "--iterations"),
        (["--height", "60"], "--height"),
        (["--scheduler", "nope"], "unknown scheduler"),
        (["--backends", "nope"], "unknown sdrt backend"),
        (["--device", "cuda"], "no CUDA device"),
        (["model-dir", "--random-weights", "tiny"], "not both"),
        (["--ort-fast-path"], "ONNX Runtime CUDA only"),
    ],
)
def test_bad_options_fail_before_anything_runs(argv, message):
    with pytest.raises(UserError, match=message):
        resolve_settings(bench_args(*argv), cuda_available=False)


def test_defaults_follow_the_device():
    cpu = resolve_settings(bench_args(), cuda_available=False)
    cuda = resolve_settings(bench_args(), cuda_available=True)
    assert (cpu.device, cpu.dtype, cpu.steps, cpu.torch_compile) == ("cpu", "fp32", 4, False)
    assert (cuda.device, cuda.dtype, cuda.steps, cuda.torch_compile) == ("cuda", "fp16", 50, True)
    assert (cpu.ort_fast_path, cuda.ort_fast_path) == (False, True)
    assert cpu.random_weights == "tiny" and cpu.scheduler == "pndm"
    assert cpu.batch_sizes == (1, 4, 8)


def test_batch_1_is_always_measured_since_the_main_table_reports_it():
    assert parse_batch_sizes("8,4") == (1, 4, 8)


def test_percentiles_are_ordered_and_exact_on_a_known_sample():
    figures = percentiles(list(range(101)))
    assert figures == {"p50": 50.0, "p90": 90.0, "p99": 99.0}


def test_time_calls_times_only_the_iterations_after_warmup_and_syncs_each():
    calls, syncs = [], []
    samples, results = time_calls(
        lambda: calls.append(1) or len(calls), lambda: syncs.append(1), warmup=2, iterations=3
    )
    assert len(calls) == 5 and results == [3, 4, 5] and len(samples) == 3
    assert len(syncs) == 4  # once after warm-up, once after each timed call


def test_loop_overhead_is_the_time_outside_the_engines():
    timings = {"total_ms": 100.0, "text_encoder_ms": 10.0, "unet_ms": 70.0, "vae_decode_ms": 15.0}
    assert loop_overhead([timings]) == {"ms": 5.0, "percent": 5.0}
    assert loop_overhead([None]) is None


def test_registering_the_subcommand_imports_no_heavy_library():
    code = (
        "import argparse, sys\n"
        "from sdrt.benchmarks.cli import register\n"
        "register(argparse.ArgumentParser().add_subparsers())\n"
        "heavy = {'torch', 'diffusers', 'transformers', 'matplotlib', 'onnxruntime'}\n"
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


class FakeNvml:
    """Stands in for pynvml: device memory in use rises by 300 MiB, then falls back."""

    def __init__(self, readings):
        self.readings = iter(readings)

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=next(self.readings))


def test_engine_memory_on_cuda_is_the_nvml_peak_above_what_was_used_before_loading(monkeypatch):
    mib = 2**20
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([1000 * mib, 1300 * mib, 1100 * mib]))
    probe = NvmlDeviceUse()
    probe.start()
    probe.sample()
    probe.sample()
    assert probe.result()["peak_bytes"] == 300 * mib


def test_engine_memory_on_cuda_without_pynvml_is_null_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    probe = NvmlDeviceUse()
    probe.start()
    probe.sample()
    result = probe.result()
    assert result["peak_bytes"] is None and "nvidia-ml-py" in result["reason"]


def test_loop_overhead_reports_every_scheduler(tiny_bundle, capsys):
    from sdrt.benchmarks.loop_overhead import main as loop_overhead
    from sdrt.schedulers import FLOW_SCHEDULERS, SCHEDULERS

    assert loop_overhead([str(tiny_bundle), "--size", "64", "--steps", "2", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    unet_schedulers = [name for name in SCHEDULERS if name not in FLOW_SCHEDULERS]
    assert [row.split("|")[1].strip() for row in rows[1:]] == unet_schedulers
    assert all(float(row.split("|")[2]) > 0 for row in rows[1:])


def test_lone_request_cost_is_measured_through_pipeline_and_batcher(tiny_bundle):
    from sdrt import Pipeline
    from sdrt.benchmarks.loop_overhead import lone_request_us_per_step, make_instant

    pipe = Pipeline.load(tiny_bundle, device="cpu")
    unet = make_instant(pipe)
    lone = lone_request_us_per_step(pipe, 64, steps=3, repeats=1)
    assert unet.calls == 4 * 3  # two rounds (one untimed) of Pipeline and Batcher, 3 steps each
    assert 0 < lone["pipeline"] < 1e6 and 0 < lone["batcher"] < 1e6


def test_cuda_bench_exports_the_ort_fast_path_bundle_at_the_native_size(tiny_pipe, tmp_path):
    from sdrt.benchmarks.cli import _export

    settings = resolve_settings(bench_args(), cuda_available=True)
    assert settings.ort_fast_path
    _export(tiny_pipe, tmp_path / "b", settings, lambda line: None)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["fused_attention"] and manifest["cuda_fusions"]
    (variant,) = manifest["components"]["unet"]["static_variants"]
    assert variant["dims"] == {"unet_batch": 2, "latent_height": 8, "latent_width": 8}


def test_the_temporary_bundle_is_never_under_out_and_sigterm_removes_it(tmp_path):
    """`timeout` sends SIGTERM: the bench must leave neither its bundle nor a stray folder."""
    import os
    import signal
    import time

    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    argv = [sys.executable, "-m", "sdrt.benchmarks.cli", *QUICK, "--out", str(out)]
    bench = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(scratch.glob("sdrt-bench-bundle-*/bundle")):
            assert bench.poll() is None and time.monotonic() < deadline, "no temporary bundle"
            time.sleep(0.1)
        assert [p.name for p in out.iterdir()] == []  # --out holds the reports only
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
    finally:
        bench.kill()
    assert bench.returncode == 130 and b"sdrt: interrupted" in err
    assert list(scratch.glob("sdrt-bench-bundle-*")) == []


def test_bench_checks_the_exports_memory_as_sdrt_export_does(tmp_path, capsys):
    argv = ["--random-weights", "tiny", *QUICK, "--max-memory", "0.2", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "above the 0.2 GiB allowed by --max-memory" in err
