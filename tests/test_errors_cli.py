"""File and command-line mistakes end in one line and exit code 2, checked before any
generation: unwritable or unnamed outputs, unreadable bundles and pictures, FIFOs,
decompression bombs, invalid Unicode, limits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdrt.cli import main

SDRT = [sys.executable, "-c", "import sys; from sdrt.cli import main; sys.exit(main())"]
NO_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def generate(bundle: Path | str, *extra: str) -> list[str]:
    return ["generate", str(bundle), "--prompt", "a cat", "--steps", "1", *extra]


@pytest.mark.parametrize(
    ("output", "line"),
    [
        ("x.jpg", "--output {tmp}/x.jpg must end in .png: sdrt writes PNGs"),
        ("x", "--output {tmp}/x must end in .png: sdrt writes PNGs"),
        ("missing/x.png", "--output folder {tmp}/missing does not exist; create it first"),
        ("folder.png", "--output {tmp}/folder.png is a directory; name a .png file"),
    ],
)
def test_output_path_is_checked_before_the_bundle_is_even_loaded(tmp_path, capsys, output, line):
    (tmp_path / "folder.png").mkdir()
    # the bundle does not exist: an output check that came after loading would name it instead
    code = main(generate(tmp_path / "no-bundle", "--output", str(tmp_path / output)))
    assert code == 2
    assert error_line(capsys) == "sdrt: error: " + line.format(tmp=tmp_path) + (
        ", whose text chunks record how the image was made" if "must end" in line else ""
    )


def test_fifo_as_image_is_refused_instead_of_hanging(tmp_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for flag in ("--image", "--mask"):
        assert main(generate(tmp_path / "b", flag, str(fifo), "--output", str(tmp_path / "o.png")))
        assert error_line(capsys) == (
            f"sdrt: error: {flag} {fifo} is not a regular file; pass an image file"
        )


def test_decompression_bomb_is_refused_from_its_header(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels in a file of about 50 KB
    assert bomb.stat().st_size < 200_000
    code = main(generate(tmp_path / "b", "--image", str(bomb), "--output", str(tmp_path / "o.png")))
    assert code == 2
    assert error_line(capsys) == (
        f"sdrt: error: --image {bomb} is 20000x20000 pixels, above the limit of 16777216; "
        "pass a smaller image or raise --max-pixels"
    )


def test_too_many_images_name_the_flag_that_raises_the_limit(tiny_bundle, tmp_path, capsys):
    code = main(generate(tiny_bundle, "--num-images", "10000", "--output", str(tmp_path / "o.png")))
    assert code == 2
    assert error_line(capsys) == (
        "sdrt: error: 10000 images asked for, at most 16 per request; ask for fewer or raise "
        "the limit (--max-images)"
    )


def test_negative_seed_is_one_line(tiny_bundle, tmp_path, capsys):
    assert main(generate(tiny_bundle, "--seed", "-1", "--output", str(tmp_path / "o.png"))) == 2
    assert error_line(capsys) == "sdrt: error: seed must be >= 0, got -1"


def test_prompt_that_is_not_utf8_is_one_line(tiny_bundle, tmp_path):
    # argv bytes that are not UTF-8 reach Python as lone surrogates
    argv = [os.fsencode(a) for a in [*SDRT, *generate(tiny_bundle)]]
    argv[argv.index(b"a cat")] = b"caf\xff"
    proc = subprocess.run(
        [*argv, b"--output", os.fsencode(tmp_path / "o.png")], capture_output=True
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines() == [
        "sdrt: error: prompt 'caf\\udcff' is not valid Unicode (character 3 stands for a byte "
        "that is not UTF-8); pass UTF-8 text"
    ]


# ---- permissions: as root, only without CAP_DAC_OVERRIDE -------------------------------------


def run_unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    """Run sdrt so file permissions apply even to root (setpriv drops the override caps)."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is not installed: permissions cannot apply")
        prefix = NO_DAC
    return subprocess.run([*prefix, *SDRT, *args], capture_output=True, text=True)


def test_unreadable_bundle_is_one_line(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "unet.onnx").chmod(0)
    proc = run_unprivileged(["info", str(bundle)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"sdrt: error: cannot read {bundle / 'unet.onnx'}: permission denied; ask for read "
        "access to the whole bundle or copy it somewhere readable"
    ]


def test_unwritable_output_folder_is_refused_before_generating(tiny_bundle, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    proc = run_unprivileged(generate(tiny_bundle, "--output", str(folder / "o.png")))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"sdrt: error: cannot write {folder}: permission denied; choose a folder you can write to"
    ]


def test_unwritable_export_destination_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    proc = run_unprivileged(["export", "--random-weights", "tiny", str(folder / "sub" / "b")])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"sdrt: error: cannot write {folder}: permission denied; choose a folder you can write to"
    )
