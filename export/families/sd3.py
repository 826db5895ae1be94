"""SD3 / SD3.5 (StableDiffusion3Pipeline): MMDiT or MMDiT-X, CLIP-L + CLIP-G + T5, a
16-channel VAE with a shift factor, flow matching."""

from __future__ import annotations

from typing import Any

import torch

from sdrt.errors import UserError

from ..onnx_export import Component, TensorSpec
from .text_encoders import random_text_encoders, text_encoder_components
from .vae import vae_components, vae_manifest

LABEL = "SD3"  # in messages
# the export options this family's graphs support: fp32 or fp16 (the measured policy), plain
# attention, dynamic shapes, the run-time LoRA branch (not --lora: fusing at export)
OPTIONS = frozenset({"fp16", "lora_rank"})
# a full-size model exports with its weights on disk (export/streamed_export.py)
STREAMED = True
PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")


def random_pipeline(spec: dict[str, Any], scheduler: Any) -> Any:
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    parts = random_text_encoders(spec["text_encoders"], spec["t5_max_length"])
    parts["transformer"] = SD3Transformer2DModel(**spec["transformer"])
    parts["vae"] = AutoencoderKL(in_channels=3, out_channels=3, **spec["vae"])
    return StableDiffusion3Pipeline(scheduler=scheduler, **parts)


def load_options(class_name: str) -> dict[str, Any]:
    return {}


def family_of(pipe: Any) -> str:
    return "sd3"


class _Transformer(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )[0]


def components(pipe: Any) -> list[Component]:
    """Text encoders, the transformer over rows of latents [rows, 16, h, w] (the CLIP tokens
    and the T5 tokens on one sequence), and the VAE."""
    if pipe.text_encoder_3 is None:
        raise UserError(
            "this SD3 pipeline has no T5 text encoder (text_encoder_3); sdrt exports SD3 with "
            "all three encoders: load the folder with its T5"
        )
    config = pipe.transformer.config
    t5_length = t5_max_length(pipe)
    tokens = pipe.tokenizer.model_max_length + t5_length
    latent = ["unet_batch", config.in_channels, "latent_height", "latent_width"]
    transformer = Component(
        "transformer",
        _Transformer(pipe.transformer),
        [
            TensorSpec("sample", "float32", latent),
            TensorSpec("timestep", "float32", ["unet_batch"]),
            TensorSpec(
                "encoder_hidden_states",
                "float32",
                ["unet_batch", tokens, config.joint_attention_dim],
            ),
            TensorSpec(
                "pooled_projections", "float32", ["unet_batch", config.pooled_projection_dim]
            ),
        ],
        [TensorSpec("noise_pred", "float32", latent)],
    )
    return [*text_encoder_components(pipe, t5_length), transformer, *vae_components(pipe.vae)]


def latent_multiple(pipe: Any) -> int:
    """Latent sizes must be a multiple of the patch size."""
    return int(pipe.transformer.config.patch_size)


def native_size(pipe: Any, vae_scale: int) -> int:
    return int(pipe.transformer.config.sample_size * vae_scale)


def add_dims(dims: dict[str, int]) -> dict[str, int]:
    return dims


def t5_max_length(pipe: Any) -> int:
    """diffusers' default `max_sequence_length` (256), or the tokenizer's own if shorter."""
    return min(pipe.tokenizer_3.model_max_length, 256)


def manifest_fields(pipe: Any) -> dict[str, Any]:
    return {
        **vae_manifest(pipe.vae),
        "schema_version": 2,
        "prediction_type": "flow",
        "denoiser_in_channels": pipe.transformer.config.in_channels,
        "patch_size": pipe.transformer.config.patch_size,
        "text_max_length": pipe.tokenizer.model_max_length,
        "t5_max_length": t5_max_length(pipe),
    }
