"""What the denoising loop does differently per model family, behind one small interface.

Each family is one module: which text encoders and how their outputs combine (conditioning),
how latents enter and leave the denoiser (layout), classifier-free or embedded guidance, and
the scheduler's options. The loop, the batcher and the backends see only "one denoiser call
over rows with per-row timestep and conditioning". A new family is one more module here and
its twin in sdrt.export.families.
"""

from __future__ import annotations

from typing import Any

from .base import Family, Layout
from .flux import Flux
from .sd3 import SD3
from .unet import UNet

FAMILIES: dict[str, Family] = {
    "sd1": UNet(),
    "sd2": UNet(),
    "sdxl": UNet(),
    "sd3": SD3(),
    "flux": Flux(),
}


def family_for(manifest: dict[str, Any]) -> Family:
    """The family a (schema-checked) manifest declares."""
    return FAMILIES[manifest["family"]]


__all__ = ["FAMILIES", "Family", "Layout", "family_for"]
