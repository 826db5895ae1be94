"""benchmarks/gpu_session.sh, the first GPU session's one device call: its dry run passes here,
every sdrt command line in it is one the CLI accepts, and its phases keep to their budgets, so
a typo or an overrun does not cost device time."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdrt.cli import _parser

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


def run_script(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, **env},
        timeout=120,
    )


def test_script_parses_as_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_dry_run_passes_offline_and_checks_commands_wheels_and_carry():
    done = run_script("--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "each one parses with the sdrt CLI" in out
    assert "onnxruntime-gpu==1.31.1" in out and "carry: the working tree is" in out
    assert out.rstrip().endswith("dry run: ok")


def test_the_dry_run_fails_on_a_command_line_the_cli_refuses(tmp_path):
    parser_only = tmp_path / "python"  # a Python that reads each line with an option added
    parser_only.write_text(f'#!/bin/sh\nsed "s/$/ --no-such-option/" | {sys.executable} "$@"\n')
    parser_only.chmod(0o755)
    done = run_script("--dry-run", PYTHON=str(parser_only))
    assert done.returncode == 1 and "FAIL: a command line" in done.stdout


def command_lines() -> list[list[str]]:
    done = run_script("commands")
    return [shlex.split(line) for line in done.stdout.splitlines()]


def test_the_bench_is_one_process_with_its_export_inside_and_no_memory_refusal():
    lines = command_lines()
    assert [argv[0] for argv in lines] == ["bench", "export", "build", "generate"]
    parser = _parser()
    bench, trt_export, *_ = (parser.parse_args(argv) for argv in lines)
    assert bench.bundle is None  # it exports its own ORT CUDA fast path
    assert (bench.device, bench.steps, bench.height, bench.width) == ("cuda", 50, 512, 512)
    assert bench.random_weights == "sd15" and bench.max_memory == 0
    assert trt_export.max_memory == 0


def test_the_lora_phase_measures_the_issue_20_figures_on_cuda_into_out():
    """The LoRA phase's command line, read by the benchmark's own parser: SD 1.5, R = 32 (the
    issue's ratios), ORT CUDA, the report under $OUT (rewritten as each part ends)."""
    from sdrt.benchmarks.lora import arguments

    done = run_script("lora-args", OUT="/x/out")
    args = arguments().parse_args(shlex.split(done.stdout))
    assert (args.preset, args.rank, args.device) == ("sd15", 32, "cuda")
    assert args.json == "/x/out/lora.json" and not args.load_only
    assert args.work and not args.work.startswith("/x/out")  # 7 GB of ONNX stay out of $OUT


FAKE_PYTHON = """#!/usr/bin/env bash
args="$*"
echo "${args//$'\n'/ }" >> "$CALLS"  # one line per call
case "$*" in
    *"import tensorrt"*) echo "No module named 'tensorrt'" >&2; exit 1 ;;
    *"sdrt.cli bench"*)
        mkdir -p "$OUT/bench" && echo '{"paths": []}' > "$OUT/bench/bench.json"
        exec sleep 60 ;;
    *"sdrt.benchmarks.lora"*)
        echo '{"load_s": [0.1]}' > "$OUT/lora.json"
        exec sleep 60 ;;
esac
"""


def test_the_session_keeps_each_phase_to_its_budget_and_leaves_results_under_out(tmp_path):
    """The whole session with a stand-in Python whose bench and LoRA benchmark overrun: each
    is stopped at its budget, what it wrote stays under $OUT, and the phases after it still
    run."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls"
    budgets = {"SESSION": "60", "ENV_BUDGET": "5", "INSTALL_BUDGET": "5", "BENCH_BUDGET": "6"}
    budgets |= {"COMPILE_BUDGET": "3", "TRT_MIN": "5", "LORA_BUDGET": "5", "LORA_MIN": "5"}
    started = time.monotonic()
    done = run_script(PYTHON=str(fake), OUT=str(out), CALLS=str(calls), **budgets)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert elapsed < 30  # bench stopped at 6 + 3 s, LoRA at 5 s (SIGKILL 10 s later at most)
    log = (out / "session.log").read_text()
    for line in ("install: exit 0", "--torch-compile: exit 124", "ORT CUDA): exit 124"):
        assert line in log, log
    assert "TensorRT skipped" in log and "done" in log
    assert (out / "env.txt").is_file() and (out / "bench" / "bench.json").is_file()
    assert (out / "lora.json").is_file()
    made = calls.read_text().splitlines()
    assert made[1].startswith("-m pip install") and "--target /tmp/sdrt" in made[1]
    assert "cuda_provider_starts()" in made[2]  # the torch-free check
    [bench] = [line for line in made if "sdrt.cli bench" in line]
    assert bench.endswith("--torch-compile") and "--max-memory 0" in bench
    [lora] = [line for line in made if "sdrt.benchmarks.lora" in line]
    assert "--device cuda" in lora and f"--json {out}/lora.json" in lora


def test_the_lora_phase_is_skipped_when_too_little_of_the_session_is_left(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls"
    budgets = {"SESSION": "60", "ENV_BUDGET": "5", "INSTALL_BUDGET": "5", "BENCH_BUDGET": "6"}
    budgets |= {"COMPILE_BUDGET": "3", "TRT_MIN": "5", "LORA_BUDGET": "60", "LORA_MIN": "59"}
    done = run_script(PYTHON=str(fake), OUT=str(out), CALLS=str(calls), **budgets)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "session.log").read_text()
    assert "LoRA phase skipped" in log and "gpu_session.sh lora" in log
    assert "sdrt.benchmarks.lora" not in calls.read_text()


@pytest.mark.parametrize("argv", [["nonsense"], ["--dry"]])
def test_unknown_phase_prints_usage_and_exits_2(argv):
    done = run_script(*argv)
    assert done.returncode == 2 and "gpu_session.sh --dry-run" in done.stdout
