"""The VAE graphs and manifest fields every family shares (latent channels, scaling and
shift factors come from the VAE's own config)."""

from __future__ import annotations

from typing import Any

from ..onnx_export import Component, TensorSpec, _VaeDecoder, _VaeEncoder


def vae_components(vae: Any) -> list[Component]:
    channels = vae.config.latent_channels
    latent = ["batch", channels, "latent_height", "latent_width"]
    image = ["batch", 3, "height", "width"]
    moments = ["batch", 2 * channels, "latent_height", "latent_width"]
    return [
        Component(
            "vae_decoder",
            _VaeDecoder(vae),
            [TensorSpec("latent", "float32", latent)],
            [TensorSpec("image", "float32", image)],
        ),
        Component(
            "vae_encoder",
            _VaeEncoder(vae),
            [TensorSpec("image", "float32", image)],
            [TensorSpec("latent_moments", "float32", moments)],
        ),
    ]


def vae_manifest(vae: Any) -> dict[str, Any]:
    return {
        "latent_channels": vae.config.latent_channels,
        "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        "vae_scaling_factor": vae.config.scaling_factor,
        "vae_shift_factor": vae.config.get("shift_factor"),
    }
