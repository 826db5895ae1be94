"""The one workload every path runs: prompt, steps, scheduler, size, the initial latents and one
denoiser call's inputs (U-Net or transformer), fixed as numpy arrays so eager PyTorch and each
engine get identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    eager_call: dict[str, Any] = field(default_factory=dict)  # diffusers-only keywords

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

    The denoiser's inputs come from the export's own I/O contract, so SDXL's added conditions,
    LCM's and Flux-dev's guidance inputs and Flux's position ids are there when the model has
    them; their values do not change the cost, so they are seeded noise, with the real first
    timestep.
    """
    from sdrt.export.families import export_family
    from sdrt.export.load import family_of
    from sdrt.export.parity import diffusers_scheduler
    from sdrt.schedulers import make_scheduler

    kind = export_family(family_of(pipe))
    denoiser = next(c for c in kind.components(pipe) if c.name in ("unet", "transformer"))
    embedded = {"timestep_cond", "guidance"} & {s.name for s in denoiser.inputs}
    guided = guidance > 1.0 and not embedded
    scale = pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, height // scale, width // scale)
    dims = {"unet_batch": 2 if guided else 1, "latent_height": shape[1], "latent_width": shape[2]}
    feeds = denoiser.sample_inputs(kind.add_dims(dims), seed=seed)
    sched = diffusers_scheduler(scheduler, dict(pipe.scheduler.config))
    # a flow schedule starts at sigma 1 (timestep 1000) whatever its dynamic shift mu
    dynamic = {"mu": 1.0} if pipe.scheduler.config.get("use_dynamic_shifting") else {}
    sched.set_timesteps(steps, **dynamic)
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
        # the bundle's T5 length, where diffusers' default may differ (SD3 256, Flux 512)
        eager_call={"max_sequence_length": kind.t5_max_length(pipe)}
        if hasattr(kind, "t5_max_length")
        else {},
    )
