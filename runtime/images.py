"""Conversions between the VAE's tensors, numpy images and PIL images, and PNG metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from .atomic_files import atomic_file


def decoded_to_numpy(decoded: np.ndarray) -> np.ndarray:
    """VAE output in [-1, 1], NCHW -> float32 NHWC in [0, 1], as diffusers' output_type="np"."""
    return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write a PNG whose text chunks record how it was made, so it can be reproduced."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    with atomic_file(path) as f:
        image.save(f, format="PNG", pnginfo=info)
