"""Flow matching (rectified flow), the schedule of the diffusion transformers (SD3/3.5, Flux.1).

Samples are x_sigma = (1 - sigma) x0 + sigma noise and the model predicts the velocity
noise - x0, so a step is x + (sigma_next - sigma) * velocity. Mirrors diffusers 0.42.1's
FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler, rounding as they do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .common import (
    check_num_inference_steps,
    exponential_sigmas,
    img2img_index,
    karras_sigmas,
    reject_unsupported,
    resolve_config,
    start_index,
)

DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}

# Options of diffusers' Euler class that this port leaves out, with the only value it accepts.
UNSUPPORTED: dict[str, Any] = {"use_beta_sigmas": False, "stochastic_sampling": False}


def dynamic_shift_mu(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """The time-shift exponent for an image of `image_seq_len` transformer tokens: linear in the
    length between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as
    diffusers' Flux and SD3 pipelines compute it (`calculate_shift`)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    intercept = base_shift - slope * base_len
    return image_seq_len * slope + intercept


def flux_sigmas(num_inference_steps: int) -> np.ndarray:
    """The unshifted sigmas Flux's pipeline hands set_timesteps: 1 down to 1/n, n of them."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


def shifted(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Static resolution shift: more of the schedule spent at high noise as `shift` grows."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def train_sigmas(num_train_timesteps: int, shift: float | None) -> np.ndarray:
    """The training sigmas, high to low in float32, shifted unless shifting is dynamic (None).

    Their ends bound the inference schedule, which diffusers then shifts a second time: SD3's
    schedule really is shifted twice, and matching it means doing the same.
    """
    n = num_train_timesteps
    sigmas = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    return sigmas if shift is None else shifted(sigmas, float(shift)).astype(np.float32)


class FlowMatchEulerDiscreteScheduler:
    """Euler steps along the predicted velocity from sigma 1 (noise) to 0 (image)."""

    order = 1
    stochastic = False
    init_noise_sigma = 1.0  # the initial latent is the noise itself, unscaled

    def __init__(self, config: Mapping[str, Any]):
        reject_unsupported(config, UNSUPPORTED, type(self).__name__)
        self.config = resolve_config(DEFAULTS, config)
        self._check_options()
        cfg = self.config
        n_train = int(cfg["num_train_timesteps"])
        shift = None if cfg["use_dynamic_shifting"] else cfg["shift"]
        self.sigmas = train_sigmas(n_train, shift)
        self.timesteps = self.sigmas * np.float32(n_train)
        self.sigma_min, self.sigma_max = float(self.sigmas[-1]), float(self.sigmas[0])
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _check_options(self) -> None:
        cfg = self.config
        if cfg["use_karras_sigmas"] and cfg["use_exponential_sigmas"]:
            raise ValueError(
                "use_karras_sigmas and use_exponential_sigmas are both set; keep at most one"
            )
        if cfg["time_shift_type"] not in ("exponential", "linear"):
            raise ValueError(
                f"time_shift_type {cfg['time_shift_type']!r} is not supported; "
                "use 'exponential' or 'linear'"
            )

    def set_timesteps(
        self,
        num_inference_steps: int,
        mu: float | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """The schedule for `num_inference_steps` steps, from custom `sigmas` if given (Flux),
        else evenly spaced between the training ends; dynamic shifting needs `mu`
        (`dynamic_shift_mu` of the image's token count)."""
        cfg = self.config
        check_num_inference_steps(cfg, num_inference_steps)
        if cfg["use_dynamic_shifting"] and mu is None:
            raise ValueError(
                "this scheduler config shifts dynamically (use_dynamic_shifting): pass mu, "
                "computed by dynamic_shift_mu from the image's sequence length"
            )
        n_train = int(cfg["num_train_timesteps"])
        if sigmas is None:
            # float64 like diffusers' np.linspace; custom sigmas are shifted in float32.
            ends = (self.sigma_max * n_train, self.sigma_min * n_train)
            schedule = np.linspace(*ends, num_inference_steps) / n_train
        else:
            schedule = np.asarray(sigmas).astype(np.float32)
            if schedule.shape != (num_inference_steps,):
                raise ValueError(
                    f"got {schedule.size} sigmas for {num_inference_steps} inference steps; "
                    "pass one sigma per step"
                )
        if cfg["use_dynamic_shifting"]:
            schedule = self._time_shift(float(mu), schedule)
        else:
            schedule = shifted(schedule, float(cfg["shift"]))
        if cfg["shift_terminal"]:
            schedule = self._stretch_to_terminal(schedule)
        if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
            respace = karras_sigmas if cfg["use_karras_sigmas"] else exponential_sigmas
            schedule = respace(schedule[-1].item(), schedule[0].item(), num_inference_steps)
        schedule = schedule.astype(np.float32)
        end = np.float32(0.0)
        if cfg["invert_sigmas"]:  # Mochi: the model is fed 1 - sigma
            schedule, end = np.float32(1.0) - schedule, np.float32(1.0)
        self.timesteps = schedule * np.float32(n_train)
        self.sigmas = np.append(schedule, end).astype(np.float32)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def _time_shift(self, mu: float, t: np.ndarray) -> np.ndarray:
        """Resolution-dependent shift: the odds (1 - t) / t divided by exp(mu) (or mu)."""
        scale = math.exp(mu) if self.config["time_shift_type"] == "exponential" else mu
        return scale / (scale + (1 / t - 1))

    def _stretch_to_terminal(self, t: np.ndarray) -> np.ndarray:
        """Rescale 1 - t so that the schedule ends at `shift_terminal` instead of near 0."""
        one_minus = 1 - t
        scale = one_minus[-1] / (1 - self.config["shift_terminal"])
        return 1 - one_minus / scale

    def set_begin_index(self, begin_index: int) -> None:
        self._begin_index = begin_index

    def _index(self, timestep: float) -> int:
        if self._step_index is None:
            self._step_index = start_index(self.timesteps, timestep, self._begin_index)
        return self._step_index

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i = self._index(timestep)
        dt = self.sigmas[i + 1] - self.sigmas[i]
        prev_sample = sample.astype(np.float32, copy=False) + dt * model_output
        self._step_index = i + 1
        return prev_sample.astype(model_output.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """The image latents noised to `timestep` (diffusers' `scale_noise`), for img2img."""
        i = img2img_index(self.timesteps, timestep, self._begin_index, self._step_index)
        return flow_forward_diffuse(original, noise, self.sigmas[i])


def flow_forward_diffuse(original: np.ndarray, noise: np.ndarray, sigma: np.float32) -> np.ndarray:
    """x = sigma noise + (1 - sigma) x0, in the sample's precision like diffusers."""
    sigma = np.asarray(sigma, dtype=original.dtype)
    return (sigma * noise + (1 - sigma) * original).astype(original.dtype, copy=False)


HEUN_DEFAULTS: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}


class FlowMatchHeunDiscreteScheduler:
    """Heun on the flow: an Euler step, then a correction by the mean of the two velocities.

    Every sigma after the first is listed twice (two model calls per noise level); the last
    step is a plain Euler step to 0, as in diffusers. No dynamic shifting and no custom sigmas:
    diffusers' class has neither, so Flux-style configs are refused rather than run unshifted.
    """

    order = 2  # model calls per noise level: img2img begins at begin_index * order
    stochastic = False
    init_noise_sigma = 1.0

    def __init__(self, config: Mapping[str, Any]):
        reject_unsupported(config, {"use_dynamic_shifting": False}, type(self).__name__)
        self.config = resolve_config(HEUN_DEFAULTS, config)
        n_train = int(self.config["num_train_timesteps"])
        sigmas = train_sigmas(n_train, self.config["shift"])
        self.sigma_min, self.sigma_max = float(sigmas[-1]), float(sigmas[0])
        self.set_timesteps(n_train)

    def set_timesteps(
        self,
        num_inference_steps: int,
        mu: float | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        check_num_inference_steps(self.config, num_inference_steps)
        if mu is not None or sigmas is not None:
            raise ValueError(
                "flow_match_heun takes neither mu nor custom sigmas (diffusers' "
                "FlowMatchHeunDiscreteScheduler has no dynamic shifting); use flow_match_euler"
            )
        n_train = int(self.config["num_train_timesteps"])
        ends = (self.sigma_max * n_train, self.sigma_min * n_train)
        schedule = np.linspace(*ends, num_inference_steps) / n_train
        schedule = shifted(schedule, float(self.config["shift"])).astype(np.float32)
        timesteps = schedule * np.float32(n_train)
        self.timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        self.sigmas = np.concatenate(
            [schedule[:1], np.repeat(schedule[1:], 2), np.zeros(1, np.float32)]
        )
        self.num_inference_steps = num_inference_steps
        self._step_index: int | None = None
        self._begin_index: int | None = None
        # Set between an Euler step and its correction: the slope, step size and start sample.
        self._euler: tuple[np.ndarray, np.float32, np.ndarray] | None = None

    def set_begin_index(self, begin_index: int) -> None:
        self._begin_index = begin_index

    def _index(self, timestep: float) -> int:
        if self._step_index is None:
            self._step_index = start_index(self.timesteps, timestep, self._begin_index)
        return self._step_index

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        i = self._index(timestep)
        x = sample.astype(np.float32, copy=False)
        # The velocity is written as (x - x0) / sigma, as diffusers rounds it.
        sigma = self.sigmas[i]
        derivative = (x - (x - model_output * sigma)) / sigma
        if self._euler is None:
            dt = self.sigmas[i + 1] - sigma
            self._euler = (derivative, dt, x)
        else:
            first_derivative, dt, x = self._euler
            derivative = 0.5 * (first_derivative + derivative)
            self._euler = None
        self._step_index = i + 1
        return (x + derivative * dt).astype(model_output.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        i = img2img_index(self.timesteps, timestep, self._begin_index, self._step_index)
        return flow_forward_diffuse(original, noise, self.sigmas[i])
