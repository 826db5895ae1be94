"""An interrupted, killed, racing or disk-full write never leaves a half file or a stray
staging directory: real `sdrt` processes are signalled mid-write and the folder is checked."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdrt.atomic_files import atomic_file, write_atomic
from sdrt.errors import UserError

SDRT = [sys.executable, "-c", "import sys; from sdrt.cli import main; sys.exit(main())"]


def start_export(dest: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*SDRT, "export", "--random-weights", "tiny", str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_staging(proc: subprocess.Popen, dest: Path) -> Path:
    """The export's staging directory once it holds a first written file (bounded wait)."""
    staging = dest.with_name(f".{dest.name}.partial-{proc.pid}")
    for _ in range(3000):  # 0.1 s apart: the export loads torch and builds the model first
        if staging.is_dir() and any(staging.iterdir()):
            return staging
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the export never started writing")


def test_sigterm_mid_export_removes_the_staging_directory(tmp_path):
    dest = tmp_path / "bundle"
    proc = start_export(dest)
    wait_for_staging(proc, dest)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert err.strip().endswith("sdrt: interrupted")
    assert list(tmp_path.iterdir()) == []


def test_sigkilled_export_blocks_no_one_and_its_staging_is_removed_by_the_next(
    tmp_path, tiny_pipe, capsys
):
    from sdrt.export.bundle_writer import export_bundle

    dest = tmp_path / "bundle"
    first = start_export(dest)
    staging = wait_for_staging(first, dest)
    first.send_signal(signal.SIGSTOP)  # alive but frozen mid-write: a second export races it
    second = subprocess.run(
        [*SDRT, "export", "--random-weights", "tiny", str(dest)], capture_output=True, text=True
    )
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == (
        f"sdrt: error: another sdrt process (pid {first.pid}) is writing {dest} right now; "
        "wait for it to finish or choose another destination"
    )
    first.kill()
    first.communicate()
    assert staging.is_dir()  # SIGKILL runs no cleanup

    export_bundle(tiny_pipe, dest, "sd1", progress=False)
    assert f"removed {staging}, left by process {first.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert (dest / "manifest.json").is_file()


def test_export_losing_the_race_to_a_finished_bundle_says_so(tmp_path, tiny_bundle):
    from sdrt.export.bundle_writer import _move_into_place

    staging = tmp_path / ".bundle.partial-1"
    staging.mkdir()
    (staging / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="written by another export while this one ran"):
        _move_into_place(staging, tiny_bundle)


def _limit_file_size(limit: int = 1024) -> None:
    """In the child: files may not grow past `limit` bytes; an oversized write fails with
    EFBIG instead of killing the process with SIGXFSZ."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_disk_mid_export_is_one_line_and_leaves_nothing(tmp_path):
    """300 KB lets the tiny text encoder's graph through; torch.onnx's write of the U-Net's
    then fails deep inside the exporter."""
    dest = tmp_path / "bundle"
    proc = subprocess.run(
        [*SDRT, "export", "--random-weights", "tiny", str(dest)],
        capture_output=True,
        text=True,
        preexec_fn=lambda: _limit_file_size(300_000),
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"sdrt: error: could not write the bundle {dest}: File too large; nothing of it was "
        "kept; free some space or export elsewhere"
    )
    assert list(tmp_path.iterdir()) == []


def test_full_disk_keeps_the_existing_output(tiny_bundle, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"the previous image")
    proc = subprocess.run(
        [*SDRT, "generate", str(tiny_bundle), "--prompt", "a cat", "--steps", "1"]
        + ["--output", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"sdrt: error: could not write {out}: File too large; the old file is unchanged; "
        "free some space or write elsewhere"
    )
    assert out.read_bytes() == b"the previous image"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_write_interrupted_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["bench.json"]
    write_atomic(path, "new")
    assert path.read_text() == "new"
