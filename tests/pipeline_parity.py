"""Shared by the pipeline parity tests: run sdrt and eager diffusers on the same latents."""

from __future__ import annotations

import numpy as np

from sdrt.export.parity import run_diffusers

PROMPT = "a photo of an astronaut riding a horse on mars"


def txt2img_difference(runtime, pipe, scheduler, latents, negative_prompt, **call) -> float:
    """Max abs difference of the two decoded images (float32 NHWC in [0, 1])."""
    ours = runtime(
        PROMPT,
        negative_prompt=negative_prompt,
        scheduler=scheduler,
        latents=latents,
        output_type="np",
        **call,
    )
    eager = run_diffusers(
        pipe, scheduler, latents, prompt=PROMPT, negative_prompt=negative_prompt, **call
    )
    assert ours.images.shape == eager.shape
    return float(np.abs(ours.images - eager).max())
