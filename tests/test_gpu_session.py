"""benchmarks/gpu_session.sh, the first GPU session's script, is valid bash and every sdrt
command line in it is one the CLI accepts: a typo must not cost device time."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from sdrt.cli import _parser

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


def test_script_parses_as_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def command_lines() -> list[list[str]]:
    done = subprocess.run(
        ["bash", str(SCRIPT), "commands"], capture_output=True, text=True, check=True
    )
    return [shlex.split(line) for line in done.stdout.splitlines()]


def test_every_sdrt_command_line_is_accepted_by_the_cli_parser():
    lines = command_lines()
    assert [argv[0] for argv in lines] == [
        "export", "info", "generate", "bench", "export", "build", "generate",
    ]  # fmt: skip
    parser = _parser()
    for argv in lines:
        args = parser.parse_args(argv)  # argparse exits (SystemExit) on a bad option
        assert callable(args.handler), argv
    export, _, generate, bench, *_ = (parser.parse_args(a) for a in lines)
    assert export.fused_attention and export.cuda_fusions and export.dtype == "fp16"
    assert (generate.device, bench.device, bench.steps) == ("cuda", "cuda", 50)
    assert (bench.height, bench.width) == (512, 512)


def test_every_step_is_time_boxed():
    text = SCRIPT.read_text()
    steps = re.findall(r"^\s*step (\S+) ", text, flags=re.M)
    assert steps and all(s.isdigit() and int(s) <= 420 for s in steps), steps
    assert 'timeout --kill-after=10 "$limit"' in text


@pytest.mark.parametrize("argv", [[], ["nonsense"]])
def test_unknown_phase_prints_usage_and_exits_2(argv):
    done = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True)
    assert done.returncode == 2 and "gpu_session.sh export" in done.stdout
