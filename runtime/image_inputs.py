"""Starting points for img2img and inpainting: the input image and mask as the VAE and U-Net
take them, and where in the schedule a partial denoise begins.

Follows diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline so the same
inputs and noise give the same latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or an HWC array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(np.shape(image)[0]), int(np.shape(image)[1])


def _as_float_array(image: Any, height: int, width: int, mode: str, what: str) -> np.ndarray:
    """PIL image or array (uint8, uint16, or float in [0, 1]) -> float32 array in [0, 1] at
    the size."""
    if isinstance(image, Image.Image):
        if image.mode.startswith("I"):  # 16-bit grayscale: PIL's convert would clip it to white
            return _sixteen_bit_gray(image, height, width, mode)
        image = image.convert(mode)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return np.asarray(image, np.float32) / 255.0
    array = np.asarray(image)
    if array.shape[:2] != (height, width):
        raise UserError(
            f"{what} array has size {array.shape[:2]}, expected ({height}, {width}); "
            "pass a PIL image to have it resized"
        )
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(array.dtype, 1.0)
    return array.astype(np.float32) / np.float32(scale)


def _sixteen_bit_gray(image: Image.Image, height: int, width: int, mode: str) -> np.ndarray:
    gray = Image.fromarray(np.asarray(image, np.float32) / 65535.0, mode="F")
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.Resampling.LANCZOS)
    array = np.clip(np.asarray(gray, np.float32), 0.0, 1.0)
    return np.repeat(array[..., None], 3, axis=2) if mode == "RGB" else array


def image_to_pixels(image: Any, height: int, width: int) -> np.ndarray:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], the VAE encoder's input."""
    array = _as_float_array(image, height, width, "RGB", "image")
    if array.ndim != 3 or array.shape[2] != 3:
        raise UserError(f"image must be RGB (H, W, 3), got shape {array.shape}")
    return (array.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def mask_to_array(mask: Any, height: int, width: int) -> np.ndarray:
    """Mask -> (1, 1, H, W) of 0 (keep) and 1 (repaint), thresholded at 0.5 like diffusers."""
    array = _as_float_array(mask, height, width, "L", "mask_image")
    if array.ndim == 3:
        array = array[..., 0]
    return (array >= 0.5).astype(np.float32)[None, None]


def latent_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour downsampling to the latent grid (torch's default interpolate)."""
    return np.ascontiguousarray(mask[:, :, ::scale, ::scale])


def sample_latents(moments: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A draw from the VAE encoder's diagonal Gaussian, given standard normal noise."""
    mean, logvar = np.split(moments, 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    return (mean + std * noise).astype(np.float32)


def strength_start(num_inference_steps: int, strength: float) -> int:
    """Index of the first step to run: strength 1 runs all, 0.5 the last half."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"strength must be in (0, 1], got {strength!r}")
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run < 1:
        raise UserError(
            f"strength {strength} leaves no step of {num_inference_steps} to run; "
            "raise strength or num_inference_steps"
        )
    return num_inference_steps - run
