"""DPM-Solver++ multistep (Lu et al., 2022): dpmpp_2m, its Karras-sigma variant and dpmpp_2m_sde.

The solver works in log-SNR time lambda = log(alpha_t / sigma_t) on data predictions x0, reusing
the previous steps' x0 for its higher orders, as diffusers' DPMSolverMultistepScheduler does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .common import (
    BASE_DEFAULTS,
    THRESHOLDING_DEFAULTS,
    check_num_inference_steps,
    img2img_index,
    karras_sigmas,
    reject_unsupported,
    resolve_config,
    sigma_to_t,
    solver_data_prediction,
    solver_timesteps,
    start_index,
    training_sigmas,
    vp_forward_diffuse,
    vp_lambda,
)

DEFAULTS: dict[str, Any] = {
    **BASE_DEFAULTS,
    "timestep_spacing": "linspace",
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf,
    "variance_type": None,
    **THRESHOLDING_DEFAULTS,
}

# Options of diffusers' class that this port leaves out, with the only value it accepts.
UNSUPPORTED: dict[str, Any] = {
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


class DPMSolverMultistepScheduler:
    """Multistep DPM-Solver++ of order 1 to 3, deterministic or SDE (then `step` takes noise)."""

    order = 1  # one model call per step

    def __init__(self, config: Mapping[str, Any]):
        reject_unsupported(config, UNSUPPORTED, type(self).__name__)
        c = resolve_config(DEFAULTS, config)
        # diffusers renames these so that configs of sibling solvers load.
        if c["algorithm_type"] == "deis":
            c["algorithm_type"] = "dpmsolver++"
        if c["solver_type"] in ("logrho", "bh1", "bh2"):
            c["solver_type"] = "midpoint"
        if c["algorithm_type"] not in ALGORITHMS:
            raise ValueError(
                f"algorithm_type {c['algorithm_type']!r} is not supported (diffusers deprecates "
                f"it); use one of {', '.join(ALGORITHMS)}"
            )
        if c["solver_order"] not in (1, 2, 3):
            raise ValueError(f"solver_order {c['solver_order']!r} is not supported; use 1, 2 or 3")
        if c["solver_type"] not in ("midpoint", "heun"):
            raise ValueError(f"solver_type {c['solver_type']!r} is not supported; use midpoint")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(
                f"final_sigmas_type {c['final_sigmas_type']!r} is not supported; "
                "use zero or sigma_min"
            )
        self.config = c
        self.stochastic = c["algorithm_type"] == "sde-dpmsolver++"
        self.init_noise_sigma = 1.0
        self.train_sigmas = training_sigmas(c)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.sigmas = np.zeros(0, dtype=np.float32)
        self._begin_index: int | None = None
        self._step_index: int | None = None
        self._x0_history: list[np.ndarray] = []

    def set_timesteps(self, num_inference_steps: int) -> None:
        c, train = self.config, self.train_sigmas
        check_num_inference_steps(c, num_inference_steps)
        last_timestep = None
        if c["lambda_min_clipped"] > -math.inf:
            # Leave out the top timesteps, whose log-SNR lies below the clip (cosine schedule).
            lambdas = -np.log(train.astype(np.float64))
            clipped = int(np.searchsorted(lambdas[::-1], c["lambda_min_clipped"]))
            last_timestep = int(c["num_train_timesteps"]) - clipped
        timesteps = solver_timesteps(c, num_inference_steps, last_timestep)
        if c["use_karras_sigmas"]:
            sigmas = karras_sigmas(train[0].item(), train[-1].item(), num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train))
            if c["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        sigma_last = train[0] if c["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self._begin_index = None
        self._step_index = None
        self._x0_history = []

    def set_begin_index(self, begin_index: int) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        if self.stochastic and noise is None:
            raise ValueError(
                "sde-dpmsolver++ is stochastic: pass noise=<standard normal array shaped like "
                "the sample> to step"
            )
        if not len(self.timesteps):
            raise ValueError("call set_timesteps(num_inference_steps) before step")
        if self._step_index is None:
            self._step_index = start_index(self.timesteps, timestep, self._begin_index)
        i, c, n = self._step_index, self.config, len(self.timesteps)

        x0 = self._data_prediction(model_output, sample, self.sigmas[i])
        self._x0_history = [*self._x0_history, x0][-c["solver_order"] :]

        # Fewer steps are less stable: the last one or two drop to lower orders.
        few_steps = c["lower_order_final"] and n < 15
        if i == n - 1 and (c["euler_at_final"] or few_steps or c["final_sigmas_type"] == "zero"):
            max_order = 1
        elif i == n - 2 and few_steps:
            max_order = 2
        else:
            max_order = 3
        # The history holds min(steps taken, solver_order) outputs: a warm-up at lower order.
        order = min(len(self._x0_history), max_order)

        prev = self._update(sample.astype(np.float32), i, order, noise)
        self._step_index += 1
        return prev.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        i = img2img_index(self.timesteps, timestep, self._begin_index, self._step_index)
        return vp_forward_diffuse(original, noise, self.sigmas[i])

    def _data_prediction(
        self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32
    ) -> np.ndarray:
        """x0 from the model output: DPM-Solver++ integrates the data prediction."""
        c = self.config
        if c["prediction_type"] == "epsilon" and c["variance_type"] in ("learned", "learned_range"):
            model_output = model_output[:, :3]  # the remaining channels predict variance
        return solver_data_prediction(c, model_output, sample, sigma)

    def _update(
        self, sample: np.ndarray, i: int, order: int, noise: np.ndarray | None
    ) -> np.ndarray:
        """x at sigma[i + 1] from x at sigma[i], with D0, D1, D2 the x0 differences of `order`."""
        c, x0s = self.config, self._x0_history
        lambda_t, alpha_t, sigma_t = vp_lambda(self.sigmas[i + 1])
        lambda_s0, _, sigma_s0 = vp_lambda(self.sigmas[i])
        h = lambda_t - lambda_s0
        if h == 0:  # a zero-length step (Karras sigmas ending at sigma_min) leaves x as it is
            return sample
        d0 = x0s[-1]
        d1 = d2 = None
        if order >= 2:
            r0 = (lambda_s0 - vp_lambda(self.sigmas[i - 1])[0]) / h
            d1_0 = (1.0 / r0) * (x0s[-1] - x0s[-2])
            d1 = d1_0
        if order == 3:
            r1 = (vp_lambda(self.sigmas[i - 1])[0] - vp_lambda(self.sigmas[i - 2])[0]) / h
            d1_1 = (1.0 / r1) * (x0s[-2] - x0s[-3])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)

        if not self.stochastic:
            em1 = math.expm1(-h)  # exp(-h) - 1
            prev = (sigma_t / sigma_s0) * sample - (alpha_t * em1) * d0
            if order == 2 and c["solver_type"] == "midpoint":
                prev = prev - 0.5 * (alpha_t * em1) * d1
            elif order >= 2:
                prev = prev + (alpha_t * (em1 / h + 1.0)) * d1
            if order == 3:
                prev = prev - (alpha_t * ((em1 + h) / h**2 - 0.5)) * d2
            return prev

        # SDE: a stronger pull toward x0 (e^-2h where the ODE has e^-h), with fresh noise
        # restoring the variance that pull removes.
        em2 = -math.expm1(-2.0 * h)  # 1 - exp(-2h)
        prev = (sigma_t / sigma_s0 * math.exp(-h)) * sample + (alpha_t * em2) * d0
        if order == 2 and c["solver_type"] == "midpoint":
            prev = prev + 0.5 * (alpha_t * em2) * d1
        elif order >= 2:
            prev = prev + (alpha_t * (em2 / (-2.0 * h) + 1.0)) * d1
        if order == 3:
            prev = prev + (alpha_t * ((em2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
        return prev + (sigma_t * math.sqrt(em2)) * noise.astype(np.float32)
