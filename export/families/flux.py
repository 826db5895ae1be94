"""Flux.1 dev and schnell (FluxPipeline): double- and single-stream blocks over 2x2-packed
latents with RoPE position ids, CLIP-L pooled + T5, dev's guidance embedding, flow matching."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..onnx_export import Component, TensorSpec
from .text_encoders import random_text_encoders, text_encoder_components
from .vae import vae_components, vae_manifest

LABEL = "Flux"  # in messages
# the export options this family's graphs support: fp32 or fp16 (the measured policy), plain
# attention, dynamic shapes, the run-time LoRA branch (not --lora: fusing at export)
OPTIONS = frozenset({"fp16", "lora_rank"})
# a full-size model exports with its weights on disk (export/streamed_export.py)
STREAMED = True
PIPELINE_CLASSES = ("FluxPipeline", "FluxImg2ImgPipeline")


def random_pipeline(spec: dict[str, Any], scheduler: Any) -> Any:
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    parts = random_text_encoders(spec["text_encoders"], spec["t5_max_length"])
    parts["transformer"] = FluxTransformer2DModel(**spec["transformer"])
    parts["vae"] = AutoencoderKL(in_channels=3, out_channels=3, **spec["vae"])
    pipe = FluxPipeline(scheduler=scheduler, **parts)
    pipe.default_sample_size = spec["size"] // pipe.vae_scale_factor  # diffusers' is 1024 px
    return pipe


def load_options(class_name: str) -> dict[str, Any]:
    return {}


def family_of(pipe: Any) -> str:
    return "flux"


class _Transformer(torch.nn.Module):
    """The runtime feeds the scheduler's timestep (sigma * 1000) to every family; Flux's
    transformer takes sigma, so the division happens here, in fp32 as diffusers does it."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=sample,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]


def _rotate(
    x: torch.Tensor,
    freqs_cis: tuple[torch.Tensor, torch.Tensor],
    use_real: bool = True,
    use_real_unbind_dim: int = -1,
    sequence_dim: int = 2,
) -> torch.Tensor:
    """diffusers' apply_rotary_emb as Flux calls it (real cos/sin, interleaved pairs, sequence
    on dim 1), with strided slices instead of its reshape over `x.shape`, which the tracer
    records with the trace's batch and token counts."""
    cos, sin = (f[None, :, None, :] for f in freqs_cis)
    real, imag = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@contextmanager
def _traceable_rope() -> Iterator[None]:
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = _rotate
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original


def components(pipe: Any) -> list[Component]:
    """Text encoders, the transformer over packed rows [rows, image_tokens, 4C] with the
    position ids of the image and text tokens, and the VAE."""
    config = pipe.transformer.config
    t5_length = t5_max_length(pipe)
    packed = ["unet_batch", "image_tokens", config.in_channels]
    inputs = [
        TensorSpec("sample", "float32", packed),
        TensorSpec("timestep", "float32", ["unet_batch"]),
        TensorSpec(
            "encoder_hidden_states",
            "float32",
            ["unet_batch", t5_length, config.joint_attention_dim],
        ),
        TensorSpec("pooled_projections", "float32", ["unet_batch", config.pooled_projection_dim]),
        TensorSpec("img_ids", "float32", ["image_tokens", 3]),
        TensorSpec("txt_ids", "float32", [t5_length, 3]),
    ]
    if config.guidance_embeds:  # dev: the guidance scale is an input, one row per image
        inputs.append(TensorSpec("guidance", "float32", ["unet_batch"]))
    transformer = Component(
        "transformer",
        _Transformer(pipe.transformer),
        inputs,
        [TensorSpec("noise_pred", "float32", packed)],
        tracing=_traceable_rope,
    )
    return [*text_encoder_components(pipe, t5_length), transformer, *vae_components(pipe.vae)]


def t5_max_length(pipe: Any) -> int:
    """diffusers' default `max_sequence_length` (512), or the tokenizer's own if shorter."""
    return min(pipe.tokenizer_2.model_max_length, 512)


def latent_multiple(pipe: Any) -> int:
    """Latents are packed 2x2."""
    return 2


def native_size(pipe: Any, vae_scale: int) -> int:
    return int(pipe.default_sample_size * vae_scale)


def add_dims(dims: dict[str, int]) -> dict[str, int]:
    """The packed sequence length of a latent size."""
    return {**dims, "image_tokens": (dims["latent_height"] // 2) * (dims["latent_width"] // 2)}


def manifest_fields(pipe: Any) -> dict[str, Any]:
    return {
        **vae_manifest(pipe.vae),
        "schema_version": 2,
        "prediction_type": "flow",
        "denoiser_in_channels": pipe.transformer.config.in_channels,
        "text_max_length": pipe.tokenizer.model_max_length,
        "t5_max_length": t5_max_length(pipe),
    }
