"""Random-weight presets have the published architectures: their parameter counts are those of
the public checkpoints (built on the meta device, so no memory is spent)."""

from __future__ import annotations

import pytest

from sdrt.export.load import family_of, random_pipeline


def millions(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


@pytest.mark.parametrize(
    ("preset", "unet", "vae", "text", "text_2", "family"),
    [
        ("sd15", 859.5, 83.7, 123.1, None, "sd1"),
        ("sd21", 865.9, 83.7, 340.4, None, "sd2"),
        ("sdxl", 2567.5, 83.7, 123.1, 694.7, "sdxl"),
    ],
)
def test_full_size_presets_match_the_published_checkpoints(preset, unet, vae, text, text_2, family):
    pipe = random_pipeline(preset, device="meta")
    assert millions(pipe.unet) == unet
    assert millions(pipe.vae) == vae
    assert millions(pipe.text_encoder) == text
    if text_2 is not None:
        assert millions(pipe.text_encoder_2) == text_2
    assert family_of(pipe) == family


@pytest.mark.parametrize(
    ("preset", "transformer", "text_encoders", "family"),
    [
        # SD3.5-medium's checkpoint holds 2469.4 M values: these 2243.2 M parameters plus its
        # 384 x 384 x 1536 position-embedding buffer
        ("sd35-medium", 2243.2, [123.7, 694.7, 4762.3], "sd3"),
        ("sd35-large", 8056.6, [123.7, 694.7, 4762.3], "sd3"),
        ("flux-dev", 11901.4, [123.1, 4762.3], "flux"),
        ("flux-schnell", 11891.2, [123.1, 4762.3], "flux"),  # no guidance embedder
    ],
)
def test_transformer_presets_match_the_published_checkpoints(
    preset, transformer, text_encoders, family
):
    pipe = random_pipeline(preset, device="meta")
    assert millions(pipe.transformer) == transformer
    assert millions(pipe.vae) == 83.8  # the 16-channel VAE
    suffixes = ["", "_2", "_3"][: len(text_encoders)]
    assert [millions(getattr(pipe, f"text_encoder{s}")) for s in suffixes] == text_encoders
    assert family_of(pipe) == family
