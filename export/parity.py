"""Run eager diffusers and an sdrt Pipeline on the same latents and measure the difference.

Used by `sdrt demo`, the benchmarks and the parity tests: the same scheduler name must mean the
same diffusers scheduler everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# sdrt scheduler name -> (diffusers class, config overrides)
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "flow_match_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_match_heun": ("FlowMatchHeunDiscreteScheduler", {}),
}


def diffusers_scheduler(name: str, config: dict[str, Any]) -> Any:
    import diffusers

    class_name, overrides = DIFFUSERS_SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config({**config, **overrides})


def denoiser(pipe: Any) -> Any:
    """A diffusers pipeline's denoiser module: its U-Net or its transformer."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def run_diffusers(pipe: Any, scheduler: str, latents: np.ndarray, **call: Any) -> np.ndarray:
    """Eager diffusers output (float32 NHWC in [0, 1]) for the given latents [B, C, h, w] and
    call args; a pipeline that takes packed latents (Flux) gets them packed its own way."""
    import torch

    pipe.scheduler = diffusers_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    param = next(denoiser(pipe).parameters())
    start = torch.from_numpy(latents).to(param.device, param.dtype)
    if hasattr(pipe, "_pack_latents"):
        start = pipe._pack_latents(start, *start.shape)
    with torch.no_grad():
        out = pipe(latents=start, output_type="np", **call)
    return np.asarray(out.images, dtype=np.float32)


def image_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Max abs difference and PSNR (dB) of two float images in [0, 1]."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float((diff**2).mean())
    return {
        "max_abs": float(diff.max()),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse)),
    }
