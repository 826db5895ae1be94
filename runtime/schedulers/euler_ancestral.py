"""Euler ancestral (k-diffusion's sample_euler_ancestral): an Euler step down to a lower sigma,
then fresh noise back up to the next sigma of the schedule.

Mirrors diffusers' EulerAncestralDiscreteScheduler. The schedule, input scaling and img2img
noising are Euler's; only the step differs, so it reuses EulerScheduler for the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .common import BASE_DEFAULTS, sigma_predicted_original
from .euler import EulerScheduler


class EulerAncestralScheduler(EulerScheduler):
    # Only the base keys: diffusers' ancestral class has no karras/exponential/final-sigma options.
    DEFAULTS: dict[str, Any] = {**BASE_DEFAULTS, "timestep_spacing": "linspace"}
    stochastic = True

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        if self.config["prediction_type"] == "sample":
            raise ValueError(
                "EulerAncestralScheduler does not support prediction_type 'sample'; "
                "use epsilon or v_prediction, or the euler scheduler"
            )

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        if noise is None:
            raise ValueError("EulerAncestralScheduler.step needs `noise` shaped like the sample")
        i = self._current_index(timestep)
        sigma_from, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        # Split sigma_to into a deterministic part (sigma_down) and injected noise (sigma_up).
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5

        x = sample.astype(np.float32, copy=False)
        prediction_type = self.config["prediction_type"]
        x0 = sigma_predicted_original(prediction_type, model_output, x, sigma_from)
        derivative = (x - x0) / sigma_from
        prev_sample = x + derivative * (sigma_down - sigma_from) + noise * sigma_up
        self._step_index = i + 1
        return prev_sample.astype(sample.dtype, copy=False)
