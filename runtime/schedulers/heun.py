"""Heun's second-order sampler (Karras et al., 2022, Algorithm 1) over the k-diffusion sigmas.

Each noise level takes two model calls, an Euler step and its trapezoidal correction, so the
schedule lists every timestep after the first twice; the loop just steps through `timesteps`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .common import (
    BASE_DEFAULTS,
    check_num_inference_steps,
    img2img_index,
    interpolated_sigmas,
    limit_predicted_original,
    reject_unsupported,
    resolve_config,
    sigma_forward_diffuse,
    sigma_init_noise,
    sigma_predicted_original,
    sigma_scaled_input,
    start_index,
)

# diffusers' Heun has no rescale_betas_zero_snr, so a config that sets it must not change Heun.
DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in BASE_DEFAULTS.items() if k != "rescale_betas_zero_snr"},
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "timestep_spacing": "linspace",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "clip_sample_range": 1.0,
}

# Options of diffusers' class that this port leaves out, with the only value it accepts.
UNSUPPORTED: dict[str, Any] = {"use_exponential_sigmas": False, "use_beta_sigmas": False}


class HeunDiscreteScheduler:
    """Heun on x_t = x0 + sigma * noise; the model sees x_t / sqrt(sigma^2 + 1)."""

    order = 2  # model calls per noise level: img2img begins at begin_index * order

    def __init__(self, config: Mapping[str, Any]):
        reject_unsupported(config, UNSUPPORTED, type(self).__name__)
        self.config = resolve_config(DEFAULTS, config)
        self.stochastic = False
        self.set_timesteps(int(self.config["num_train_timesteps"]))

    @property
    def init_noise_sigma(self) -> float:
        return sigma_init_noise(self.config, self.sigmas.max())

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_num_inference_steps(self.config, num_inference_steps)
        timesteps, sigmas = interpolated_sigmas(self.config, num_inference_steps)
        # Interleave: [s0, s1, s1, s2, s2, ..., 0] against [t0, t1, t1, t2, t2, ...].
        self.sigmas = np.concatenate(
            [sigmas[:1], np.repeat(sigmas[1:], 2), np.zeros(1, np.float32)]
        ).astype(np.float32)
        self.timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        self._begin_index: int | None = None
        self._step_index: int | None = None
        # Set between an Euler step and its correction: the slope, step size and start sample.
        self._euler: tuple[np.ndarray, np.float32, np.ndarray] | None = None

    def set_begin_index(self, begin_index: int) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sigma_scaled_input(sample, self.sigmas[self._index(timestep)])

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i = self._index(timestep)
        # The model was evaluated at sigma[i] in both stages (the correction at the Euler result).
        sigma = self.sigmas[i]
        x0 = sigma_predicted_original(self.config["prediction_type"], model_output, sample, sigma)
        x0 = limit_predicted_original(x0, {**self.config, "thresholding": False})
        derivative = (sample - x0) / sigma
        if self._euler is None:
            dt = self.sigmas[i + 1] - sigma
            self._euler = (derivative, dt, sample)
        else:
            first_derivative, dt, sample = self._euler
            derivative = (first_derivative + derivative) / 2
            self._euler = None
        self._step_index = i + 1
        return (sample + derivative * dt).astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        i = img2img_index(self.timesteps, timestep, self._begin_index, self._step_index)
        return sigma_forward_diffuse(original, noise, self.sigmas[i])

    def _index(self, timestep: float) -> int:
        if self._step_index is None:
            self._step_index = start_index(self.timesteps, timestep, self._begin_index)
        return self._step_index
