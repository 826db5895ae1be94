"""The `sdrt` command: PNG metadata, one-line errors with exit code 2, info."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from sdrt.cli import main


def test_generate_writes_png_with_its_recipe(tiny_bundle, tmp_path):
    out = tmp_path / "cat.png"
    code = main(
        [
            "generate",
            str(tiny_bundle),
            "--prompt",
            "a cat",
            "--negative-prompt",
            "dog",
            "--steps",
            "3",
            "--seed",
            "7",
            "--scheduler",
            "euler",
            "--output",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert image.text["prompt"] == "a cat"
    assert image.text["seed"] == "7"
    assert image.text["steps"] == "3"
    assert image.text["scheduler"] == "euler"


def test_user_error_is_one_line_and_exit_code_2(tiny_bundle, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdrt.cli",
            "generate",
            str(tiny_bundle),
            "--prompt",
            "x",
            "--height",
            "60",
            "--output",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "height must be a positive multiple of 16" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_info_describes_the_bundle(tiny_bundle, capsys):
    assert main(["info", str(tiny_bundle)]) == 0
    printed = capsys.readouterr().out
    assert "unet" in printed and "sd1" in printed and "pndm" in printed


def test_missing_bundle_is_a_user_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_img2img_from_a_file_and_bad_image_path(tiny_bundle, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source)
    out = tmp_path / "out.png"
    args = ["generate", str(tiny_bundle), "--prompt", "x", "--steps", "4", "--device", "cpu"]
    assert main([*args, "--image", str(source), "--strength", "0.5", "--output", str(out)]) == 0
    assert Image.open(out).text["strength"] == "0.5"
    assert main([*args, "--image", str(tmp_path / "missing.png"), "--output", str(out)]) == 2


def test_tensorrt_commands_fail_clearly_without_tensorrt(tiny_bundle, capsys):
    assert main(["build", str(tiny_bundle), "--batch", "4-1"]) == 2
    assert "minimum above its maximum" in capsys.readouterr().err
    assert main(["build", str(tiny_bundle)]) == 2
    assert "pip install 'sdrt[tensorrt-cu13]'" in capsys.readouterr().err
    assert main(["generate", str(tiny_bundle), "--prompt", "x", "--backend", "tensorrt"]) == 2
    assert "pip install 'sdrt[tensorrt-cu13]'" in capsys.readouterr().err


def test_demo_exports_generates_and_matches_diffusers(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--output", str(out), "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference vs eager diffusers" in printed
    assert Image.open(out).size == (64, 64)


def test_device_names_reach_the_backend_and_a_typo_exits_2(tiny_bundle, tmp_path, capsys):
    args = ["generate", str(tiny_bundle), "--prompt", "x", "--steps", "1"]
    assert main([*args, "--device", "cuda:x", "--output", str(tmp_path / "x.png")]) == 2
    assert "unknown device 'cuda:x'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
