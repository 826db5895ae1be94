"""DDIM (Song et al., 2021): deterministic jumps between integer timesteps, x0 then re-noised.

Mirrors diffusers' DDIMScheduler with eta = 0, the setting every SD pipeline uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .common import (
    BASE_DEFAULTS,
    THRESHOLDING_DEFAULTS,
    alphas_cumprod_for,
    check_num_inference_steps,
    final_alpha_cumprod,
    forward_diffuse,
    limit_predicted_original,
    predicted_noise,
    predicted_original,
    resolve_config,
    spaced_timesteps,
)


class DDIMScheduler:
    DEFAULTS: dict[str, Any] = {
        **BASE_DEFAULTS,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        **THRESHOLDING_DEFAULTS,
    }
    order = 1
    stochastic = False
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]):
        self.config = resolve_config(self.DEFAULTS, config)
        self.alphas_cumprod = alphas_cumprod_for(self.config)
        self.final_alpha_cumprod = final_alpha_cumprod(self.config, self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.config["num_train_timesteps"])[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_num_inference_steps(self.config, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        spaced = spaced_timesteps(self.config, num_inference_steps)
        self.timesteps = np.round(spaced).astype(np.int64)

    def set_begin_index(self, begin_index: int) -> None:
        """Nothing to do: each step depends only on its own timestep, so any suffix just works."""

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step called before set_timesteps; call it first")
        t = int(timestep)
        # diffusers steps back by the leading-spacing stride whatever the spacing; so do we.
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        prediction_type = self.config["prediction_type"]
        x0 = predicted_original(prediction_type, model_output, sample, alpha_prod_t)
        eps = predicted_noise(prediction_type, model_output, sample, alpha_prod_t)
        x0 = limit_predicted_original(x0, self.config)

        prev_sample = alpha_prod_t_prev**0.5 * x0 + (1 - alpha_prod_t_prev) ** 0.5 * eps
        return prev_sample.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        return forward_diffuse(self.alphas_cumprod, original, noise, timestep)
