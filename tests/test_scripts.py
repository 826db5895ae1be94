"""What each setup script installs: the main job's (scripts/demo.sh) only what `sdrt demo`
needs; the tests' (scripts/test.sh) the test environments, Triton's venv included.

scripts/install.sh runs as written, in a copy of the repository, with a stand-in `python3`
first on PATH: it makes venvs whose `python` records every pip call, and lays out the files
nvidia-pytriton ships where the script copies from. Nothing is downloaded or installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A Python that logs its arguments; `-m venv DIR` makes DIR a venv of itself, `-c` runs the
# real interpreter, and installing nvidia-pytriton lays out its python-backend stub.
STAND_IN = """#!/usr/bin/env bash
echo "$(basename "$(dirname "$(dirname "$0")")") $*" >> "$PIP_LOG"
if [ "$1" = -c ]; then exec "$REAL_PYTHON" "$@"; fi
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    cp "$0" "$3/bin/python"
    printf 'export PATH="%s/bin:$PATH"\\n' "$(cd "$3" && pwd)" > "$3/bin/activate"
fi
case "$*" in *nvidia-pytriton*)
    home="$(dirname "$0")/../lib/python$PY_VERSION/site-packages/pytriton/tritonserver"
    mkdir -p "$home/python_backend_stubs/$PY_VERSION" "$home/backends/python"
    touch "$home/python_backend_stubs/$PY_VERSION/triton_python_backend_stub"
    chmod +x "$home/python_backend_stubs/$PY_VERSION/triton_python_backend_stub";;
esac
"""


def run_install(tmp_path: Path, *args: str) -> list[str]:
    """scripts/install.sh ARGS in a copy of the repository; the pip calls, as "VENV ARGS"."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text(STAND_IN)
    (fake_bin / "python3").chmod(0o755)
    log = tmp_path / "pip.log"
    env = {
        **os.environ,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "PIP_LOG": str(log),
        "REAL_PYTHON": sys.executable,
        "PY_VERSION": "{}.{}".format(*sys.version_info[:2]),
    }
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(
        ["bash", "scripts/install.sh", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return [line for line in log.read_text().splitlines() if " -m pip install" in line]


def test_the_main_job_installs_only_what_the_demo_needs(tmp_path):
    calls = run_install(tmp_path)
    assert calls == [
        ".venv -m pip install -q --upgrade pip",
        ".venv -m pip install -q torch==2.13.0",
        ".venv -m pip install -q -e .[export,cpu]",
    ]
    assert not (tmp_path / "repo" / ".venv-triton").exists()


def test_the_tests_get_the_dev_extras_the_tensorrt_stubs_and_tritons_venv(tmp_path):
    calls = run_install(tmp_path, "--test")
    assert ".venv -m pip install -q -e .[dev]" in calls
    assert ".venv -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1" in calls
    assert ".venv-triton -m pip install -q --no-deps nvidia-pytriton==0.7.0" in calls
    assert ".venv -m pip install -q -e .[export,cpu]" not in calls  # dev holds them
    assert (tmp_path / "repo" / ".venv-triton").is_dir()


def test_an_unknown_option_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="usage: scripts/install.sh"):
        run_install(tmp_path, "--tests")
