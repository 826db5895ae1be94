"""LCM (Luo et al., 2023): a consistency model jumps straight to x0 at each step, then re-noises
to the next timestep with fresh noise.

Mirrors diffusers' LCMScheduler. The timesteps are a subset of the `original_inference_steps`
schedule the model was distilled on, so timestep_spacing and steps_offset do not apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .common import (
    BASE_DEFAULTS,
    THRESHOLDING_DEFAULTS,
    alphas_cumprod_for,
    final_alpha_cumprod,
    forward_diffuse,
    limit_predicted_original,
    predicted_original,
    resolve_config,
    start_index,
)

SIGMA_DATA = 0.5  # data standard deviation assumed by the consistency boundary condition


class LCMScheduler:
    DEFAULTS: dict[str, Any] = {
        **BASE_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        **THRESHOLDING_DEFAULTS,
        "timestep_scaling": 10.0,
    }
    order = 1
    stochastic = True
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]):
        self.config = resolve_config(self.DEFAULTS, config)
        self.alphas_cumprod = alphas_cumprod_for(self.config)
        self.final_alpha_cumprod = final_alpha_cumprod(self.config, self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.config["num_train_timesteps"])[::-1].copy()
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        original_steps = self.config["original_inference_steps"]
        n_train = self.config["num_train_timesteps"]
        if original_steps > n_train:
            raise ValueError(
                f"original_inference_steps {original_steps} exceeds num_train_timesteps "
                f"{n_train}; lower it in the scheduler config"
            )
        if not 0 < num_inference_steps <= original_steps:
            raise ValueError(
                f"num_inference_steps {num_inference_steps} must be in 1..{original_steps} "
                "(the original_inference_steps the model was distilled on); use fewer steps"
            )
        # The distillation schedule, high to low, then evenly spaced picks from it.
        stride = n_train // original_steps
        origin = (np.arange(1, original_steps + 1) * stride - 1)[::-1]
        picks = np.floor(np.linspace(0, original_steps, num_inference_steps, endpoint=False))
        self.timesteps = origin[picks.astype(np.int64)].astype(np.int64)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def set_begin_index(self, begin_index: int) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def _boundary_scalings(self, t: int) -> tuple[np.float32, np.float32]:
        """c_skip, c_out: make the consistency function the identity at t = 0."""
        scaled_t = np.float32(t) * np.float32(self.config["timestep_scaling"])
        c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
        c_out = scaled_t / (scaled_t**2 + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        if noise is None:
            raise ValueError("LCMScheduler.step needs `noise` shaped like the sample; draw it")
        if self.num_inference_steps is None:
            raise ValueError("LCMScheduler.step called before set_timesteps; call it first")
        if self._step_index is None:
            self._step_index = start_index(self.timesteps, timestep, self._begin_index)
        t = int(timestep)
        next_index = self._step_index + 1
        prev_t = int(self.timesteps[next_index]) if next_index < len(self.timesteps) else t
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        c_skip, c_out = self._boundary_scalings(t)
        x0 = predicted_original(self.config["prediction_type"], model_output, sample, alpha_prod_t)
        x0 = limit_predicted_original(x0, self.config)
        denoised = c_out * x0 + c_skip * sample

        if self._step_index != self.num_inference_steps - 1:
            prev_sample = alpha_prod_t_prev**0.5 * denoised + (1 - alpha_prod_t_prev) ** 0.5 * noise
        else:
            prev_sample = denoised
        self._step_index += 1
        return prev_sample.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        return forward_diffuse(self.alphas_cumprod, original, noise, timestep)
