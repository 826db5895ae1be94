"""PNDM (Liu et al., 2022): linear multistep (PLMS) on the noise prediction, optionally warmed up
with pseudo Runge-Kutta (PRK) steps.

Mirrors diffusers' PNDMScheduler. Stable Diffusion checkpoints set skip_prk_steps=True: the first
step is then a two-evaluation improved-Euler step, which is why the schedule repeats a timestep.
The multistep history makes this scheduler stateful: call set_timesteps before every run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .common import (
    BASE_DEFAULTS,
    alphas_cumprod_for,
    check_num_inference_steps,
    final_alpha_cumprod,
    forward_diffuse,
    predicted_noise,
    resolve_config,
    spaced_timesteps,
)

PNDM_ORDER = 4


class PNDMScheduler:
    # diffusers' PNDMScheduler has no zero-terminal-SNR option: a config asking for it is ignored.
    DEFAULTS: dict[str, Any] = {
        **{k: v for k, v in BASE_DEFAULTS.items() if k != "rescale_betas_zero_snr"},
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
    }
    order = 1
    stochastic = False
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]):
        self.config = resolve_config(self.DEFAULTS, config)
        if self.config["prediction_type"] == "sample":
            raise ValueError(
                "PNDMScheduler does not support prediction_type 'sample'; "
                "use epsilon or v_prediction, or pick another scheduler"
            )
        self.alphas_cumprod = alphas_cumprod_for(self.config)
        self.final_alpha_cumprod = final_alpha_cumprod(self.config, self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.prk_timesteps = np.array([], dtype=np.int64)
        self.timesteps = np.array([], dtype=np.int64)
        self._reset_history()

    def _reset_history(self) -> None:
        self.counter = 0  # steps taken since set_timesteps
        self.ets: list[np.ndarray] = []  # past noise predictions, oldest first
        self.cur_model_output: np.ndarray | float = 0.0  # PRK: weighted sum of the 4 evaluations
        self.cur_sample: np.ndarray | None = None  # sample at the start of a multi-evaluation step

    def set_timesteps(self, num_inference_steps: int) -> None:
        check_num_inference_steps(self.config, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        rising = np.round(spaced_timesteps(self.config, num_inference_steps))[::-1].astype(np.int64)
        if self.config["skip_prk_steps"]:
            # The second-to-last entry repeats: the first step evaluates the model twice.
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([rising[:-1], rising[-2:-1], rising[-1:]])[::-1]
        else:
            # Four RK steps over the top timesteps, each visiting t, t - h/2, t - h/2, t - h.
            half = self.config["num_train_timesteps"] // num_inference_steps // 2
            prk = rising[-PNDM_ORDER:].repeat(2) + np.tile([0, half], PNDM_ORDER)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = rising[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self._reset_history()

    def set_begin_index(self, begin_index: int) -> None:
        """Nothing to do: like diffusers, a part-way run starts its history afresh."""

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
            raise ValueError("PNDMScheduler.step called before set_timesteps; call it first")
        # Copied: the history must survive a caller that reuses its output buffer.
        model_output = np.array(model_output, copy=True)
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            prev_sample = self._step_prk(model_output, int(timestep), sample)
        else:
            prev_sample = self._step_plms(model_output, int(timestep), sample)
        self.counter += 1
        return prev_sample.astype(sample.dtype, copy=False)

    def _step_prk(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """One of the four evaluations of a classic RK4 step, weighted 1/6, 1/3, 1/3, 1/6."""
        half = self.config["num_train_timesteps"] // self.num_inference_steps // 2
        prev_t = t - (0 if self.counter % 2 else half)
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0.0
        start = self.cur_sample if self.cur_sample is not None else sample
        return self._prev_sample(start, t, prev_t, model_output)

    def _step_plms(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """Adams-Bashforth on the noise prediction, order growing from 1 to 4 with history."""
        stride = self.config["num_train_timesteps"] // self.num_inference_steps
        prev_t = t - stride
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            # Second evaluation of the first step: redo t -> t - stride with the averaged slope.
            prev_t = t
            t = t + stride

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._prev_sample(sample, t, prev_t, model_output)

    def _prev_sample(
        self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray
    ) -> np.ndarray:
        """Formula (9) of the PNDM paper: the transfer from x_t to x_{t-delta} given eps."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        eps = predicted_noise(self.config["prediction_type"], model_output, sample, alpha_prod_t)

        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        eps_denom = (
            alpha_prod_t * beta_prod_t_prev**0.5
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
        )
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / eps_denom

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        return forward_diffuse(self.alphas_cumprod, original, noise, timestep)
