"""DDPM (Ho et al., 2020): ancestral sampling, fresh Gaussian noise at every step but the last.

Mirrors diffusers' DDPMScheduler for the fixed variance types (learned variances need a model
that outputs twice the channels, which Stable Diffusion UNets do not).
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
    forward_diffuse,
    limit_predicted_original,
    predicted_original,
    resolve_config,
    spaced_timesteps,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPMScheduler:
    DEFAULTS: dict[str, Any] = {
        **BASE_DEFAULTS,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        **THRESHOLDING_DEFAULTS,
    }
    order = 1
    stochastic = True
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]):
        self.config = resolve_config(self.DEFAULTS, config)
        if self.config["variance_type"] not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type {self.config['variance_type']!r} is not supported; "
                f"use one of {', '.join(VARIANCE_TYPES)}"
            )
        self.alphas_cumprod = alphas_cumprod_for(self.config)
        self.timesteps = np.arange(self.config["num_train_timesteps"])[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_num_inference_steps(self.config, num_inference_steps)
        spaced = spaced_timesteps(self.config, num_inference_steps)
        self.timesteps = np.round(spaced).astype(np.int64)

    def set_begin_index(self, begin_index: int) -> None:
        """Nothing to do: each step finds its successor by looking its timestep up."""

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def _previous_timestep(self, t: int) -> int:
        index = int(np.flatnonzero(self.timesteps == t)[0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        if noise is None:
            raise ValueError("DDPMScheduler.step needs `noise` shaped like the sample; draw it")
        t = int(timestep)
        prev_t = self._previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1.0)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        x0 = predicted_original(self.config["prediction_type"], model_output, sample, alpha_prod_t)
        x0 = limit_predicted_original(x0, self.config)

        # Mean of the posterior q(x_{t-1} | x_t, x0): formula (7) of the DDPM paper.
        x0_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
        sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        if t > 0:
            # Posterior variance, floored so its log stays finite.
            variance = max(beta_prod_t_prev / beta_prod_t * current_beta_t, np.float32(1e-20))
            variance_type = self.config["variance_type"]
            if variance_type == "fixed_small_log":
                std = np.exp(0.5 * np.log(variance))
            elif variance_type == "fixed_large":
                std = current_beta_t**0.5
            else:
                std = variance**0.5
            prev_sample = prev_sample + std * noise
        return prev_sample.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        return forward_diffuse(self.alphas_cumprod, original, noise, timestep)
