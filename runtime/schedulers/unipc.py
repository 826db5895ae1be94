"""UniPC multistep (Zhao et al., 2023): a predictor (UniP) and a corrector (UniC) per model call.

Each step first corrects the sample the previous step predicted, using the model output just
computed at it, then predicts the next one, as diffusers' UniPCMultistepScheduler does.
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
    vp_alpha_sigma,
    vp_forward_diffuse,
    vp_lambda,
)

DEFAULTS: dict[str, Any] = {
    **BASE_DEFAULTS,
    "timestep_spacing": "linspace",
    "solver_order": 2,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "use_karras_sigmas": False,
    "final_sigmas_type": "zero",
    **THRESHOLDING_DEFAULTS,
}

# Options of diffusers' class that this port leaves out, with the only value it accepts.
UNSUPPORTED: dict[str, Any] = {
    "solver_p": None,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}


class UniPCMultistepScheduler:
    """UniPC with B(h) = h (bh1) or e^h - 1 (bh2), on x0 (predict_x0) or noise predictions."""

    order = 1  # one model call per step

    def __init__(self, config: Mapping[str, Any]):
        reject_unsupported(config, UNSUPPORTED, type(self).__name__)
        c = resolve_config(DEFAULTS, config)
        if c["solver_type"] in ("midpoint", "heun", "logrho"):
            c["solver_type"] = "bh2"  # as diffusers does, so DPM-Solver configs load
        if c["solver_type"] not in ("bh1", "bh2"):
            raise ValueError(f"solver_type {c['solver_type']!r} is not supported; use bh1 or bh2")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(
                f"final_sigmas_type {c['final_sigmas_type']!r} is not supported; "
                "use zero or sigma_min"
            )
        if (
            c["solver_order"] > 1
            and not c["lower_order_final"]
            and c["final_sigmas_type"] == "zero"
        ):
            # Its higher orders divide by the infinite log-SNR step to sigma 0 (diffusers: NaN).
            raise ValueError(
                "UniPC with lower_order_final=False cannot end at sigma 0; set "
                "lower_order_final=True or final_sigmas_type='sigma_min'"
            )
        self.config = c
        self.stochastic = False
        self.init_noise_sigma = 1.0
        self.train_sigmas = training_sigmas(c)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.sigmas = np.zeros(0, dtype=np.float32)
        self._begin_index: int | None = None
        self._step_index: int | None = None
        self._history: list[np.ndarray] = []
        self._last_sample: np.ndarray | None = None
        self._last_order = 1

    def set_timesteps(self, num_inference_steps: int) -> None:
        c, train = self.config, self.train_sigmas
        check_num_inference_steps(c, num_inference_steps)
        timesteps = solver_timesteps(c, num_inference_steps)
        if c["use_karras_sigmas"]:
            sigmas = karras_sigmas(train[0].item(), train[-1].item(), num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train)).round()
            sigma_min = sigmas[-1]
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
            sigma_min = train[0]
        sigma_last = sigma_min if c["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self._begin_index = None
        self._step_index = None
        self._history = []
        self._last_sample = None

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
        if not len(self.timesteps):
            raise ValueError("call set_timesteps(num_inference_steps) before step")
        if self._step_index is None:
            self._step_index = start_index(self.timesteps, timestep, self._begin_index)
        i, c = self._step_index, self.config

        converted = self._convert(model_output, sample, self.sigmas[i])
        if i > 0 and i - 1 not in c["disable_corrector"] and self._last_sample is not None:
            # UniC: redo the last prediction now that the model has been evaluated at its result.
            sample = self._bh_update(self._last_sample, i - 1, self._last_order, converted)
        self._history = [*self._history, converted][-c["solver_order"] :]

        order = c["solver_order"]
        if c["lower_order_final"]:
            order = min(order, len(self.timesteps) - i)
        # The history holds min(steps taken, solver_order) outputs: a warm-up at lower order.
        self._last_order = min(order, len(self._history))
        self._last_sample = sample
        prev = self._bh_update(sample, i, self._last_order)
        self._step_index += 1
        return prev.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        i = img2img_index(self.timesteps, timestep, self._begin_index, self._step_index)
        return vp_forward_diffuse(original, noise, self.sigmas[i])

    def _convert(
        self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32
    ) -> np.ndarray:
        """The model output as the solver's variable: x0 (predict_x0) or noise."""
        c = self.config
        if c["predict_x0"]:
            return solver_data_prediction(c, model_output, sample, sigma)
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        if c["prediction_type"] == "epsilon":
            return model_output
        if c["prediction_type"] == "v_prediction":
            return alpha_t * model_output + sigma_t * sample
        return (sample - alpha_t * model_output) / sigma_t

    def _bh_update(
        self, x: np.ndarray, s: int, order: int, model_t: np.ndarray | None = None
    ) -> np.ndarray:
        """x at sigma[s + 1] from x at sigma[s]: UniP, or with `model_t` (the converted output at
        sigma[s + 1]) UniC. The history's newest entry is the output at sigma[s]."""
        c, m = self.config, self._history
        lambda_t, alpha_t, sigma_t = vp_lambda(self.sigmas[s + 1])
        lambda_s0, alpha_s0, sigma_s0 = vp_lambda(self.sigmas[s])
        h = lambda_t - lambda_s0
        if h == 0:  # a zero-length step (Karras sigmas ending at sigma_min) leaves x as it is
            return x
        rks, d1s = [], []
        for k in range(1, order):
            rk = (vp_lambda(self.sigmas[s - k])[0] - lambda_s0) / h
            rks.append(rk)
            d1s.append((m[-(k + 1)] - m[-1]) / np.float32(rk))
        rks.append(1.0)

        hh = -h if c["predict_x0"] else h
        h_phi_1 = math.expm1(hh)  # h * phi_1(h) = e^h - 1
        b_h = hh if c["solver_type"] == "bh1" else h_phi_1
        # b_p = p! * h * phi_{p+1}(h) / B(h), from phi_{k+1}(h) = (phi_k(h) - 1 / k!) / h.
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
        for p in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= p + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r = np.array([np.power(rks, p) for p in range(order)])

        if model_t is None:
            if order == 1:
                rhos = []
            elif order == 2:
                rhos = [0.5]
            else:
                rhos = list(np.linalg.solve(r[:-1, :-1], b[:-1]))
            terms = list(zip(rhos, d1s, strict=True))
        else:
            rhos = [0.5] if order == 1 else list(np.linalg.solve(r, b))
            terms = [*zip(rhos[:-1], d1s, strict=True), (rhos[-1], model_t - m[-1])]

        if c["predict_x0"]:
            prev = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m[-1]
            scale = alpha_t * b_h
        else:
            prev = (alpha_t / alpha_s0) * x - (sigma_t * h_phi_1) * m[-1]
            scale = sigma_t * b_h
        # Skipped when empty: B(h) is infinite on a step to sigma 0 (bh1), and inf * 0 is NaN.
        for rho, d in terms:
            prev = prev - (scale * float(rho)) * d
        return prev
