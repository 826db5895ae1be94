"""`sdrt export` of diffusion transformers: diffusers folders of StableDiffusion3Pipeline and
FluxPipeline, per-component parity in the manifest, and one line for what is not supported."""

from __future__ import annotations

import json

import pytest

from sdrt.cli import main


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """preset -> a diffusers folder saved from its random-weight pipeline."""
    from sdrt.export.load import random_pipeline

    folders = {}

    def save(preset):
        if preset not in folders:
            folders[preset] = tmp_path_factory.mktemp("folders") / preset
            random_pipeline(preset, seed=1).save_pretrained(folders[preset])
        return folders[preset]

    return save


@pytest.mark.parametrize(
    ("preset", "family", "encoders"),
    [
        ("tiny-sd3", "sd3", ["text_encoder", "text_encoder_2", "text_encoder_3"]),
        ("tiny-flux", "flux", ["text_encoder", "text_encoder_2"]),
    ],
)
def test_export_of_a_diffusers_folder_records_parity_per_component(
    dit_folder, tmp_path, preset, family, encoders
):
    bundle = tmp_path / "bundle"
    assert main(["export", str(dit_folder(preset)), str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["family"] == family
    assert manifest["schema_version"] == 2
    assert manifest["latent_channels"] == 16
    assert manifest["vae_shift_factor"] in (0.0609, 0.1159)
    assert sorted(manifest["components"]) == sorted(
        [*encoders, "transformer", "vae_decoder", "vae_encoder"]
    )
    for name, entry in manifest["components"].items():
        assert entry["parity"]["max_rel"] < 1e-5, name  # measured at most 2.3e-6
    assert set(manifest["tokenizer_files"]) == {
        e.replace("text_encoder", "tokenizer") for e in encoders
    }


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (["--cuda-fusions"], "--cuda-fusions"),
        (["--fused-attention", "--static-size", "64x64"], "--fused-attention, --static-size"),
        (["--lora", "missing.safetensors"], "--lora"),
    ],
)
def test_options_a_transformer_does_not_support_are_one_line(tmp_path, capsys, flags, refused):
    args = ["export", "--random-weights", "tiny-flux", str(tmp_path / "b")]
    assert main([*args, *flags]) == 2
    assert error_line(capsys) == (
        f"sdrt: error: {refused} is not supported for Flux models yet; export without it "
        "(plain attention, dynamic shapes)"
    )
    assert not (tmp_path / "b").exists()


def test_export_command_gives_a_transformer_the_run_time_lora_branch(tmp_path):
    out = tmp_path / "b"
    args = ["export", "--random-weights", "tiny-flux", str(out), "--lora-rank", "4"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    branch = manifest["lora_branch"]
    assert branch["rank"] == 4 and set(branch["layers"]) == {"transformer", "text_encoder"}
    inputs = {spec["name"] for spec in manifest["components"]["transformer"]["inputs"]}
    assert {"lora_index", "lora_scale", "lora_a.single_transformer_blocks.0.proj_out"} <= inputs


def test_an_unsupported_pipeline_class_lists_the_supported_ones(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    assert main(["export", str(folder), str(tmp_path / "b")]) == 2
    line = error_line(capsys)
    assert line.startswith(f"sdrt: error: {folder} holds a WanPipeline model; sdrt exports ")
    assert "StableDiffusion3Pipeline" in line and "FluxPipeline" in line
