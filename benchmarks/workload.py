"""The one workload every path runs: prompt, steps, scheduler, size, the initial latents and one
U-Net call's inputs, fixed as numpy arrays so eager PyTorch and each engine get identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Workload:
    prompt: str
    negative_prompt: str  # "" means none given: each pipeline applies its own default
    steps: int
    guidance: float
    guided: bool  # classifier-free guidance doubles the U-Net batch (not for LCM's embedding)
    stochastic: bool  # the scheduler draws noise each step, differently in diffusers and sdrt
    scheduler: str
    height: int
    width: int
    latents: dict[int, np.ndarray]  # batch size -> initial latents
    unet_feeds: dict[str, np.ndarray]  # one guided batch-1 U-Net call, named as in the bundle
    timestep: np.ndarray  # 0-d, the scheduler's first timestep in diffusers' own dtype
    latent: np.ndarray  # the VAE decoder's input for one image

    def call(self, batch: int) -> dict[str, Any]:
        """Keyword arguments that diffusers' pipeline and sdrt's Pipeline both accept."""
        call: dict[str, Any] = {
            "prompt": [self.prompt] * batch,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "height": self.height,
            "width": self.width,
        }
        if self.negative_prompt:  # LCM's diffusers pipeline takes no negative prompt at all
            call["negative_prompt"] = [self.negative_prompt] * batch
        return call

    def summary(self) -> dict[str, Any]:
        """What bench.json records about the inputs beyond the settings."""
        return {
            "guided": self.guided,
            "unet_batch": len(self.unet_feeds["sample"]),
            "first_timestep": self.timestep.item(),
            "stochastic_scheduler": self.stochastic,
            "unet_inputs": sorted(self.unet_feeds),
        }


def initial_latents(batch: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Seeded noise; every batch starts with the batch-1 latents, so row 0 is comparable."""
    return np.random.default_rng(seed).standard_normal((batch, *shape), np.float32)


def make_workload(
    pipe: Any,
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    guidance: float,
    scheduler: str,
    height: int,
    width: int,
    seed: int,
    batch_sizes: tuple[int, ...],
) -> Workload:
    """Latents for each batch size and stage inputs for the diffusers `pipe`'s architecture.

    The U-Net inputs come from the export's own I/O contract, so SDXL's added conditions and
    LCM's guidance embedding are there when the model has them; their values do not change the
    cost, so they are seeded noise, with the real first timestep.
    """
    from sdrt.export.onnx_export import components
    from sdrt.export.parity import diffusers_scheduler
    from sdrt.schedulers import make_scheduler

    unet = next(c for c in components(pipe) if c.name == "unet")
    guided = guidance > 1.0 and "timestep_cond" not in {s.name for s in unet.inputs}
    scale = pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, height // scale, width // scale)
    dims = {"unet_batch": 2 if guided else 1, "latent_height": shape[1], "latent_width": shape[2]}
    feeds = unet.sample_inputs(dims, seed=seed)
    sched = diffusers_scheduler(scheduler, dict(pipe.scheduler.config))
    sched.set_timesteps(steps)
    timestep = sched.timesteps[0].numpy()
    feeds["timestep"] = np.full(dims["unet_batch"], timestep, np.float32)
    latents = {batch: initial_latents(batch, shape, seed) for batch in batch_sizes}
    return Workload(
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        guided=guided,
        stochastic=make_scheduler(scheduler, dict(pipe.scheduler.config)).stochastic,
        scheduler=scheduler,
        height=height,
        width=width,
        latents=latents,
        unet_feeds=feeds,
        timestep=timestep,
        latent=latents[1] / np.float32(pipe.vae.config.scaling_factor),
    )
