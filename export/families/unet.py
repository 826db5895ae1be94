"""SD 1.x / 2.x / XL (and their img2img, inpainting and LCM pipelines): CLIP text encoders,
a U-Net over [rows, 4 (or 9), h, w], the 4-channel VAE."""

from __future__ import annotations

from typing import Any

from ..onnx_export import components as unet_components
from .text_encoders import random_clip
from .vae import vae_manifest

LABEL = "U-Net"  # in messages
# the export options this family's graphs support (ONNX Runtime CUDA's fast path, fp16)
OPTIONS = frozenset(
    {"fused_attention", "cuda_fusions", "static_sizes", "fp16", "lora", "lora_rank"}
)
PIPELINE_CLASSES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)


def random_pipeline(spec: dict[str, Any], scheduler: Any) -> Any:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    parts: dict[str, Any] = {"scheduler": scheduler}
    parts["tokenizer"], parts["text_encoder"] = random_clip(
        spec["text_encoder"], spec.get("pad_token", "<|endoftext|>"), projection=False
    )
    if "text_encoder_2" in spec:  # SDXL: OpenCLIP bigG with its pooled projection
        parts["tokenizer_2"], parts["text_encoder_2"] = random_clip(
            spec["text_encoder_2"], "!", projection=True
        )
    parts["unet"] = UNet2DConditionModel(**{"in_channels": 4, "out_channels": 4, **spec["unet"]})
    parts["vae"] = AutoencoderKL(in_channels=3, out_channels=3, **spec["vae"])
    if spec["family"] == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**parts)
    return diffusers.StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def load_options(class_name: str) -> dict[str, Any]:
    """from_pretrained options: SD 1/2 pipelines come without their safety checker."""
    return {} if "XL" in class_name else {"safety_checker": None, "requires_safety_checker": False}


def family_of(pipe: Any) -> str:
    """sd1 / sd2 / sdxl from the text encoders (CLIP ViT-L, OpenCLIP ViT-H, or both + bigG)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1"


def components(pipe: Any) -> list[Any]:
    return unet_components(pipe)


def latent_multiple(pipe: Any) -> int:
    """The U-Net halves the latent once per down block but the last; sizes must divide evenly,
    since the traced graph has no path for odd sizes."""
    return 2 ** (len(pipe.unet.config.down_block_types) - 1)


def native_size(pipe: Any, vae_scale: int) -> int:
    """The image side the model was trained at: its U-Net's latent size times the VAE's scale."""
    return int(pipe.unet.config.sample_size * vae_scale)


def add_dims(dims: dict[str, int]) -> dict[str, int]:
    return dims


def manifest_fields(pipe: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,  # U-Net bundles stay readable by sdrt before the DiT families
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        **vae_manifest(pipe.vae),
        "unet_in_channels": pipe.unet.config.in_channels,
        "text_max_length": pipe.tokenizer.model_max_length,
        # SDXL encodes an absent negative prompt as zeros rather than as ""
        "zero_negative_prompt": bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
    }
