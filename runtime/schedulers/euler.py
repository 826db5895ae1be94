"""Euler (Karras et al., 2022, Algorithm 2 without churn): first-order ODE steps in sigma space.

Mirrors diffusers' EulerDiscreteScheduler. Samples live at scale sigma rather than 1, so the model
input is divided by sqrt(sigma^2 + 1) and the initial noise is multiplied by init_noise_sigma.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .common import (
    BASE_DEFAULTS,
    check_num_inference_steps,
    exponential_sigmas,
    img2img_index,
    karras_sigmas,
    resolve_config,
    sigma_forward_diffuse,
    sigma_init_noise,
    sigma_predicted_original,
    sigma_scaled_input,
    sigma_to_t,
    spaced_timesteps,
    start_index,
    training_sigmas,
)


class EulerScheduler:
    DEFAULTS: dict[str, Any] = {
        **BASE_DEFAULTS,
        "timestep_spacing": "linspace",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }
    order = 1
    stochastic = False

    def __init__(self, config: Mapping[str, Any]):
        # Resolved twice so that a subclass lacking some of Euler's options (euler ancestral)
        # runs with Euler's defaults for them, as diffusers' from_config would drop them.
        own = resolve_config(self.DEFAULTS, config)
        self.config = resolve_config(EulerScheduler.DEFAULTS, own)
        self._check_options()
        self.train_sigmas = training_sigmas(self.config)
        self.num_inference_steps: int | None = None
        n_train = self.config["num_train_timesteps"]
        self.timesteps = np.arange(n_train, dtype=np.float32)[::-1].copy()
        self.sigmas = np.concatenate([self.train_sigmas[::-1], [0.0]]).astype(np.float32)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _check_options(self) -> None:
        cfg = self.config
        if cfg["use_beta_sigmas"]:
            raise ValueError(
                "use_beta_sigmas is not supported (it needs scipy); "
                "use use_karras_sigmas or use_exponential_sigmas instead"
            )
        if cfg["use_karras_sigmas"] and cfg["use_exponential_sigmas"]:
            raise ValueError(
                "use_karras_sigmas and use_exponential_sigmas are both set; keep at most one"
            )
        checks = {
            "interpolation_type": ("linear", "log_linear"),
            "timestep_type": ("discrete", "continuous"),
            "final_sigmas_type": ("zero", "sigma_min"),
        }
        for key, allowed in checks.items():
            if cfg[key] not in allowed:
                raise ValueError(f"{key} {cfg[key]!r} is not supported; use one of {allowed}")

    @property
    def init_noise_sigma(self) -> float:
        return sigma_init_noise(self.config, self.sigmas.max())

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        check_num_inference_steps(cfg, num_inference_steps)
        timesteps = spaced_timesteps(cfg, num_inference_steps).astype(np.float32)
        train_sigmas = self.train_sigmas
        log_train_sigmas = np.log(train_sigmas)
        if cfg["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        else:
            # As diffusers: n + 1 sigmas from the top down to the smallest training sigma.
            top, bottom = log_train_sigmas[-1], log_train_sigmas[0]
            sigmas = np.exp(np.linspace(top, bottom, num_inference_steps + 1).astype(np.float32))

        if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
            sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            respace = karras_sigmas if cfg["use_karras_sigmas"] else exponential_sigmas
            sigmas = respace(sigma_min, sigma_max, num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_train_sigmas)

        sigma_last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
            # EDM-style models are conditioned on c_noise = log(sigma) / 4, not a timestep.
            self.timesteps = (0.25 * np.log(self.sigmas[:-1])).astype(np.float32)
        else:
            self.timesteps = timesteps.astype(np.float32)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def set_begin_index(self, begin_index: int) -> None:
        self._begin_index = begin_index

    def _current_index(self, timestep: float) -> int:
        """The sigma index of this step: found on the first call, then counted."""
        if self._step_index is None:
            self._step_index = start_index(self.timesteps, timestep, self._begin_index)
        return self._step_index

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        sigma = self.sigmas[self._current_index(timestep)]
        return sigma_scaled_input(sample, sigma).astype(sample.dtype, copy=False)

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i = self._current_index(timestep)
        sigma = self.sigmas[i]
        x = sample.astype(np.float32, copy=False)
        x0 = sigma_predicted_original(self.config["prediction_type"], model_output, x, sigma)
        derivative = (x - x0) / sigma
        prev_sample = x + derivative * (self.sigmas[i + 1] - sigma)
        self._step_index = i + 1
        return prev_sample.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        index = img2img_index(self.timesteps, timestep, self._begin_index, self._step_index)
        return sigma_forward_diffuse(original, noise, self.sigmas[index])
