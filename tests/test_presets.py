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
