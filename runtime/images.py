"""Conversions between the VAE's tensors, numpy images and PIL images, and the metadata that
records how an image was made (PNG text chunks; EXIF in JPEG and WebP)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, PngImagePlugin

from .atomic_files import atomic_file


def decoded_to_numpy(decoded: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], NCHW -> float32 NHWC in [0, 1], as diffusers' output_type="np"."""
    return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def generation_metadata(
    args: Any, image_name: str | None = None, mask_name: str | None = None
) -> dict[str, Any]:
    """The PNG text chunks of an image made from checked arguments (`GenerationArgs`)."""
    return {
        "prompt": args.prompts[0],
        "negative_prompt": args.negatives[0] if args.negatives else "",
        "seed": args.seed,
        "steps": args.num_inference_steps,
        "scheduler": args.scheduler,
        "guidance": args.guidance_scale,
        "generator": "sdrt",
        **({"image": image_name, "strength": args.strength} if args.image is not None else {}),
        **({"mask": mask_name} if args.mask_image is not None else {}),
        **({"loras": ", ".join(f"{k}:{v}" for k, v in args.loras.items())} if args.loras else {}),
    }


def save_png(image: Image.Image, path: str | Path | IO[bytes], metadata: dict[str, Any]) -> None:
    """Write a PNG whose text chunks record how it was made, so it can be reproduced."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    if not isinstance(path, (str, Path)):  # an open stream, e.g. an HTTP response body
        image.save(path, format="PNG", pnginfo=info)
        return
    with atomic_file(path) as f:
        image.save(f, format="PNG", pnginfo=info)


OUTPUT_FORMATS = ("png", "jpeg", "webp")
EXIF_DESCRIPTION, EXIF_SOFTWARE = 0x010E, 0x0131  # ImageDescription, Software


def encode_image(
    image: Image.Image, output_format: str, compression: int, metadata: dict[str, Any]
) -> bytes:
    """The image as `output_format` bytes carrying `metadata`: PNG text chunks, or for JPEG and
    WebP one EXIF ImageDescription holding the same keys as JSON (ASCII, as EXIF wants).
    `compression` (0-100) is the JPEG/WebP quality; PNG is lossless and ignores it."""
    buffer = io.BytesIO()
    if output_format == "png":
        save_png(image, buffer, metadata)
        return buffer.getvalue()
    exif = Image.Exif()
    exif[EXIF_DESCRIPTION] = json.dumps({k: str(v) for k, v in metadata.items()})
    exif[EXIF_SOFTWARE] = "sdrt"
    image.save(buffer, format=output_format.upper(), quality=compression, exif=exif)
    return buffer.getvalue()
