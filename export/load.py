"""Load a Stable Diffusion checkpoint for export: a diffusers folder, a single .safetensors
file, or a random-weight build of a published architecture.

Weights load through safetensors; pickle checkpoints run arbitrary code when unpickled, so they
are refused unless the caller opts in.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from sdrt.errors import UserError

from .checkpoint_files import check_pickle_checkpoint, safetensors_header
from .presets import PRESETS
from .tokenizer_files import write_byte_level_clip_vocab

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)


def load_pipeline(
    source: str | None,
    random_weights: str | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
) -> Any:
    """A diffusers StableDiffusionPipeline in float32 on the CPU, ready to trace."""
    if random_weights is not None:
        return random_pipeline(random_weights, seed=seed)
    path = checked_source(source, allow_pickle)
    if path.is_dir():
        return _load_folder(path, allow_pickle)
    return _load_single_file(path)


def checked_source(source: str | None, allow_pickle: bool) -> Path:
    """The model path, refused in one line unless it is a folder, a .safetensors file whose
    header holds together, or (with `allow_pickle`) a pickle checkpoint: checked from the
    file's first bytes, before anything is sized from its numbers."""
    if source is None:
        raise UserError(
            "no model given: pass a diffusers folder or .safetensors file, "
            "or --random-weights tiny|sd15|sd21|sdxl"
        )
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"model {source!r} does not exist; pass a diffusers folder or a .safetensors file"
        )
    if path.is_dir():
        return path
    if path.suffix == ".safetensors":
        safetensors_header(path)
        return path
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{path.name} is a pickle checkpoint, which can run arbitrary code "
                "when loaded; convert it to .safetensors or pass --allow-pickle"
            )
        check_pickle_checkpoint(path)
        return path
    raise UserError(f"{path.name} is neither a diffusers folder nor a .safetensors file")


def _load_folder(path: Path, allow_pickle: bool) -> Any:
    import diffusers

    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} has no model_index.json; is it a diffusers model folder?")
    pickled = [
        folder.name
        for folder in sorted(path.iterdir())
        if folder.is_dir()
        and not list(folder.glob("*.safetensors"))
        and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir())
    ]
    if pickled and not allow_pickle:
        raise UserError(
            f"{path} holds pickle weights without a safetensors copy "
            f"({', '.join(pickled)}), which can run arbitrary code when loaded; "
            "convert them to safetensors or pass --allow-pickle"
        )
    class_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    if class_name not in SUPPORTED_PIPELINES:
        raise UserError(
            f"{path} holds a {class_name or 'unknown'} model; sdrt exports "
            f"{', '.join(SUPPORTED_PIPELINES)}"
        )
    extra = {} if "XL" in class_name else {"safety_checker": None, "requires_safety_checker": False}
    return getattr(diffusers, class_name).from_pretrained(
        path,
        **extra,
        use_safetensors=None if pickled else True,
    )


def _load_single_file(path: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), safety_checker=None, requires_safety_checker=False
        )
    except OSError as err:  # diffusers fetches the architecture config from the Hub
        reason = " ".join(str(err).split())  # diffusers' Hub errors span several lines
        raise UserError(
            f"could not read {path.name} as a single-file checkpoint ({reason}); "
            "convert it to a diffusers folder first"
        ) from err


def random_pipeline(preset: str, seed: int = 0, device: str = "cpu") -> Any:
    """The preset's architecture with seeded random weights and a byte-level CLIP vocabulary.

    device="meta" builds the modules without memory, to check a preset's shapes cheaply.
    """
    import diffusers
    import torch

    if preset not in PRESETS:
        raise UserError(
            f"unknown random-weight preset {preset!r}; choose one of {', '.join(PRESETS)}"
        )
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    with torch.device(device):
        parts = _random_modules(spec)
    parts["scheduler"] = getattr(diffusers, spec["scheduler"]["_class_name"]).from_config(
        spec["scheduler"]
    )
    if spec["family"] == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**parts)
    return diffusers.StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _random_modules(spec: dict[str, Any]) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    parts: dict[str, Any] = {}
    tokenizer, parts["text_encoder"] = _random_text_encoder(
        spec["text_encoder"], spec.get("pad_token", "<|endoftext|>"), projection=False
    )
    parts["tokenizer"] = tokenizer
    if "text_encoder_2" in spec:  # SDXL: OpenCLIP bigG with its pooled projection
        parts["tokenizer_2"], parts["text_encoder_2"] = _random_text_encoder(
            spec["text_encoder_2"], "!", projection=True
        )
    parts["unet"] = UNet2DConditionModel(**{"in_channels": 4, "out_channels": 4, **spec["unet"]})
    parts["vae"] = AutoencoderKL(in_channels=3, out_channels=3, **spec["vae"])
    return parts


def _random_text_encoder(config: dict[str, Any], pad_token: str, projection: bool) -> Any:
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_byte_level_clip_vocab(tmp, pad_token=pad_token)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_config = CLIPTextConfig(
        **{
            "max_position_embeddings": 77,
            **config,
            "vocab_size": max(config.get("vocab_size", 0), vocab_size),
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(text_config)
    return tokenizer, model


def family_of(pipe: Any) -> str:
    """sd1 / sd2 / sdxl from the text encoders (CLIP ViT-L, OpenCLIP ViT-H, or both + bigG)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1"
