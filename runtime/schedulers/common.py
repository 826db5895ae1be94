"""Noise-schedule arithmetic shared by every scheduler family: betas, timestep spacing, sigmas.

Each function mirrors the diffusers formula of the same purpose so that the schedulers built on
top of it can be compared with diffusers step by step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

# The config keys every family understands; a family adds its own on top of these.
BASE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class Scheduler(Protocol):
    """The two-call contract the denoising loop relies on (as in diffusers)."""

    timesteps: np.ndarray
    init_noise_sigma: float
    order: int
    stochastic: bool  # True: step() needs `noise` drawn by the caller

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def set_begin_index(self, begin_index: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray: ...

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def add_noise(
        self, original: np.ndarray, noise: np.ndarray, timestep: float
    ) -> np.ndarray: ...


def resolve_config(defaults: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Class defaults overridden by the keys of `config` the class knows, like `from_config`."""
    resolved = dict(defaults)
    resolved.update({k: v for k, v in config.items() if k in defaults})
    if resolved.get("prediction_type") not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {resolved.get('prediction_type')!r} is not supported; "
            f"use one of {', '.join(PREDICTION_TYPES)}"
        )
    if resolved.get("timestep_spacing") not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"timestep_spacing {resolved.get('timestep_spacing')!r} is not supported; "
            f"use one of {', '.join(TIMESTEP_SPACINGS)}"
        )
    return resolved


def betas_for(config: Mapping[str, Any]) -> np.ndarray:
    """The training beta schedule, float32 like diffusers' tensors."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif config["beta_schedule"] == "linear":
        betas = _linspace_f32(config["beta_start"], config["beta_end"], n)
    elif config["beta_schedule"] == "scaled_linear":
        betas = _linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    elif config["beta_schedule"] == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(
            f"beta_schedule {config['beta_schedule']!r} is not supported; "
            "use linear, scaled_linear or squaredcos_cap_v2"
        )
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit: np.linspace rounds differently in the last ulp,
    which the cumulative product amplifies into ~1e-6 relative error in the top sigmas."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    head = np.float64(start32) + step * i
    tail = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, head, tail).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """Cumulative product accumulated in float64 and stored as float32, as torch does on CPU."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift the schedule so the last timestep has zero SNR (Lin et al., 2023)."""
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(1.0 - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod_for(config: Mapping[str, Any]) -> np.ndarray:
    return _cumprod_f32(1.0 - betas_for(config))


def spaced_timesteps(config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
    """Inference timesteps, high to low, as float64 (linspace is left unrounded).

    Integer-timestep families round this; sigma families interpolate at these points.
    """
    n = int(config["num_train_timesteps"])
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, n - 1, num_inference_steps)[::-1].copy()
    if spacing == "leading":
        ratio = n // num_inference_steps
        steps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy()
        return steps + int(config["steps_offset"])
    ratio = n / num_inference_steps
    return np.round(np.arange(n, 0, -ratio)) - 1


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, high to low."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolated in log-sigma space."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def predicted_original(
    prediction_type: str,
    model_output: np.ndarray,
    sample: np.ndarray,
    alpha_prod_t: float,
) -> np.ndarray:
    """x0 from a model output in any of the three parameterisations (alpha-based families)."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
    return model_output
