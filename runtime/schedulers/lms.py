"""Linear multistep (LMS) sampler of Karras et al. (2022) over the k-diffusion sigma schedule.

Each step integrates the Lagrange polynomial through the last four derivatives dx/dsigma. The
integrals are done exactly with numpy polynomials (diffusers uses scipy's quad, to the same end).
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
    reject_unsupported,
    resolve_config,
    sigma_forward_diffuse,
    sigma_init_noise,
    sigma_predicted_original,
    sigma_scaled_input,
    start_index,
)

# diffusers' LMS has no rescale_betas_zero_snr, so a config that sets it must not change LMS.
DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in BASE_DEFAULTS.items() if k != "rescale_betas_zero_snr"},
    "timestep_spacing": "linspace",
    "use_karras_sigmas": False,
}

# Options of diffusers' class that this port leaves out, with the only value it accepts.
UNSUPPORTED: dict[str, Any] = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

LMS_ORDER = 4  # diffusers' default `order` argument of step()


class LMSDiscreteScheduler:
    """LMS of order up to 4 on x_t = x0 + sigma * noise; the model sees x_t / sqrt(sigma^2 + 1)."""

    order = 1  # one model call per step

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
        self.timesteps, sigmas = interpolated_sigmas(self.config, num_inference_steps)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self._begin_index: int | None = None
        self._step_index: int | None = None
        self._derivatives: list[np.ndarray] = []

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
        sigma = self.sigmas[i]
        x0 = sigma_predicted_original(self.config["prediction_type"], model_output, sample, sigma)
        self._derivatives = [*self._derivatives, (sample - x0) / sigma][-LMS_ORDER:]
        # As in diffusers the order follows the step index, not the history: a schedule entered
        # part-way (img2img) pairs its few derivatives with the leading higher-order weights.
        order = min(i + 1, LMS_ORDER)
        coefficients = [self._coefficient(order, i, j) for j in range(order)]
        prev = sample
        for coefficient, derivative in zip(coefficients, reversed(self._derivatives), strict=False):
            prev = prev + coefficient * derivative
        self._step_index = i + 1
        return prev.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        i = img2img_index(self.timesteps, timestep, self._begin_index, self._step_index)
        return sigma_forward_diffuse(original, noise, self.sigmas[i])

    def _index(self, timestep: float) -> int:
        if self._step_index is None:
            self._step_index = start_index(self.timesteps, timestep, self._begin_index)
        return self._step_index

    def _coefficient(self, order: int, t: int, j: int) -> float:
        """Integral over [sigma_t, sigma_t+1] of the Lagrange basis polynomial of node t - j.

        Plain coefficient arrays (np.poly/polyint/polyval) rather than Polynomial objects: this
        runs `order` times per step, inside the denoising loop.
        """
        sigmas = self.sigmas.astype(np.float64)
        others = np.array([sigmas[t - k] for k in range(order) if k != j])
        basis = np.poly(others) / np.prod(sigmas[t - j] - others)
        antiderivative = np.polyint(np.atleast_1d(basis))
        return float(
            np.polyval(antiderivative, sigmas[t + 1]) - np.polyval(antiderivative, sigmas[t])
        )
