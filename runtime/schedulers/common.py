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

# The keys `limit_predicted_original` reads for dynamic thresholding, at diffusers' defaults.
THRESHOLDING_DEFAULTS: dict[str, Any] = {
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
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

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray: ...


def resolve_config(defaults: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Class defaults overridden by the keys of `config` the class knows, like `from_config`.

    Keys listed in `_use_default_values` (an in-memory diffusers config) were never chosen, only
    filled in by the source class; from_config drops them, so the target's defaults apply.
    """
    filled_in = set(config.get("_use_default_values") or ())
    resolved = dict(defaults)
    resolved.update({k: v for k, v in config.items() if k in defaults and k not in filled_in})
    if "prediction_type" in defaults and resolved["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {resolved.get('prediction_type')!r} is not supported; "
            f"use one of {', '.join(PREDICTION_TYPES)}"
        )
    if "timestep_spacing" in defaults and resolved["timestep_spacing"] not in TIMESTEP_SPACINGS:
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


def final_alpha_cumprod(config: Mapping[str, Any], alphas_cumprod: np.ndarray) -> np.float32:
    """alphas_cumprod past the last step, which has no previous timestep: a clean image (1) with
    `set_alpha_to_one`, else the first training alpha."""
    return np.float32(1.0) if config["set_alpha_to_one"] else alphas_cumprod[0]


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


def predicted_clean(
    config: Mapping[str, Any], model_input: np.ndarray, model_output: np.ndarray, timestep: float
) -> np.ndarray:
    """x0 as the model sees it at `timestep`, for every family (the server's previews).

    Flow matching (the configs with `shift`): the input is (1 - sigma) x0 + sigma noise, the
    output the velocity noise - x0, and the model's timestep is sigma times the training steps.
    Every other family: `scale_model_input` brings the sample to the variance-preserving form
    sqrt(abar) x0 + sqrt(1 - abar) noise, with abar from the training sigma at `timestep`
    (interpolated in log sigma, as the Karras schedules' fractional timesteps were made).
    """
    if "shift" in config:
        sigma = np.float32(timestep / config["num_train_timesteps"])
        return (model_input - sigma * model_output).astype(model_output.dtype, copy=False)
    train = training_sigmas(config).astype(np.float64)
    sigma = np.exp(np.interp(timestep, np.arange(len(train)), np.log(train)))
    x0 = predicted_original(
        config["prediction_type"], model_output, model_input, 1 / (1 + sigma**2)
    )
    return x0.astype(model_output.dtype, copy=False)


def predicted_noise(
    prediction_type: str,
    model_output: np.ndarray,
    sample: np.ndarray,
    alpha_prod_t: float,
) -> np.ndarray:
    """The noise (epsilon) from a model output in any of the three parameterisations."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    return (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5


def limit_predicted_original(x0: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """x0 dynamically thresholded or clipped as the config asks (both meant for pixel-space models).

    Dynamic thresholding (Imagen): per sample, clip to the `dynamic_thresholding_ratio` quantile
    of |x0| (kept within [1, sample_max_value]) and divide by it.
    """
    if config["thresholding"]:
        flat = x0.reshape(x0.shape[0], -1)
        s = np.quantile(np.abs(flat), config["dynamic_thresholding_ratio"], axis=1)
        s = np.clip(s, 1, config["sample_max_value"])[:, np.newaxis].astype(x0.dtype)
        return (np.clip(flat, -s, s) / s).reshape(x0.shape)
    if config["clip_sample"]:
        limit = config["clip_sample_range"]
        return np.clip(x0, -limit, limit)
    return x0


def forward_diffuse(
    alphas_cumprod: np.ndarray, original: np.ndarray, noise: np.ndarray, timestep: float
) -> np.ndarray:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise: the training-time noising, for img2img."""
    alpha_prod = alphas_cumprod[int(timestep)]
    noisy = alpha_prod**0.5 * original + (1 - alpha_prod) ** 0.5 * noise
    return noisy.astype(original.dtype, copy=False)


def vp_forward_diffuse(original: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """x = alpha_t x_0 + sigma_t noise at noise level `sigma`: img2img noising of the multistep
    solvers, which diffusers computes from their sigmas rather than from alphas_cumprod."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    return (alpha_t * original + sigma_t * noise).astype(original.dtype, copy=False)


def sigma_forward_diffuse(original: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """x = x_0 + sigma noise: img2img noising of the families that keep samples unscaled."""
    return (original + noise * sigma).astype(original.dtype, copy=False)


def training_sigmas(config: Mapping[str, Any]) -> np.ndarray:
    """Noise level sigma of every training timestep, low to high, float32.

    With zero terminal SNR the last sigma would be infinite; diffusers' sigma schedulers pin
    alphas_cumprod[-1] to 2**-24 instead, and so do we.
    """
    alphas_cumprod = alphas_cumprod_for(config)
    if config.get("rescale_betas_zero_snr"):
        alphas_cumprod[-1] = 2**-24
    return sigmas_from_alphas_cumprod(alphas_cumprod).astype(np.float32)


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Noise levels evenly spaced in log sigma, high to low."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def index_for_timestep(timesteps: np.ndarray, timestep: float) -> int:
    """Position of `timestep` in the schedule; the second one when it occurs twice.

    Taking the second occurrence keeps a schedule entered part-way (img2img) from skipping a
    sigma, as diffusers does.
    """
    matches = np.flatnonzero(timesteps == timestep)
    if matches.size == 0:
        raise ValueError(
            f"timestep {timestep} is not in this schedule; pass one of scheduler.timesteps "
            "after set_timesteps"
        )
    return int(matches[1] if matches.size > 1 else matches[0])


def reject_unsupported(
    config: Mapping[str, Any], unsupported: Mapping[str, Any], scheduler: str
) -> None:
    """Refuse a config option left out of our port rather than sample differently from diffusers.

    `unsupported` maps each such key to the one value we do honour (diffusers' default).
    """
    for key, default in unsupported.items():
        if config.get(key, default) != default:
            raise ValueError(
                f"{scheduler} does not support {key}={config[key]!r}; "
                f"set it to {default!r} in the scheduler config or choose another scheduler"
            )


def start_index(timesteps: np.ndarray, timestep: float, begin_index: int | None) -> int:
    """Schedule position of the first step: the begin index if set, else where `timestep` is."""
    return begin_index if begin_index is not None else index_for_timestep(timesteps, timestep)


def img2img_index(
    timesteps: np.ndarray, timestep: float, begin_index: int | None, step_index: int | None
) -> int:
    """Schedule position whose sigma `add_noise` uses, chosen as diffusers does.

    Without set_begin_index it is looked up; otherwise the begin index, or the current step once
    stepping has started (inpainting re-noises the known region every step).
    """
    if begin_index is None:
        return index_for_timestep(timesteps, timestep)
    return begin_index if step_index is None else step_index


def solver_timesteps(
    config: Mapping[str, Any], num_inference_steps: int, last_timestep: int | None = None
) -> np.ndarray:
    """Integer timesteps of the multistep solvers (DPM-Solver, UniPC), high to low.

    Unlike `spaced_timesteps`, linspace and leading space n + 1 points and drop the final t = 0:
    the solvers' last step lands on sigma 0 from a timestep above zero.
    """
    n = int(config["num_train_timesteps"])
    last = n if last_timestep is None else last_timestep
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        steps = np.linspace(0, last - 1, num_inference_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = last // (num_inference_steps + 1)
        steps = (np.arange(0, num_inference_steps + 1) * ratio).round()[::-1][:-1]
        steps = steps + int(config["steps_offset"])
    else:
        steps = np.arange(last, 0, -n / num_inference_steps).round() - 1
    return steps.astype(np.int64)


def vp_alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the variance-preserving process whose sigma_t / alpha_t is `sigma`."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def interpolated_sigmas(
    config: Mapping[str, Any], num_inference_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of the sigma families (LMS, Heun), both float32 and high to low.

    Sigmas are interpolated at the spaced timesteps; with `use_karras_sigmas` they are respaced
    between the ends of that range and the timesteps follow them. No final zero is appended.
    """
    timesteps = spaced_timesteps(config, num_inference_steps).astype(np.float32)
    train = training_sigmas(config)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    if config.get("use_karras_sigmas"):
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)
        timesteps = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
    return timesteps, sigmas.astype(np.float32)


def sigma_init_noise(config: Mapping[str, Any], sigma_max: float) -> float:
    """Scale of the initial latent noise for the sigma families, as diffusers computes it."""
    sigma_max = np.float32(sigma_max)
    if config["timestep_spacing"] in ("linspace", "trailing"):
        return float(sigma_max)
    return float((sigma_max**2 + np.float32(1)) ** np.float32(0.5))


def sigma_predicted_original(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32
) -> np.ndarray:
    """x0 from a model output, for the families that keep x_t = x0 + sigma * noise (unscaled)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output


def sigma_scaled_input(sample: np.ndarray, sigma: np.float32) -> np.ndarray:
    """x / sqrt(sigma^2 + 1): an unscaled sample brought back to the unit variance the model saw
    in training (the sigma families)."""
    return sample / ((sigma**2 + 1) ** 0.5)


def solver_data_prediction(
    config: Mapping[str, Any], model_output: np.ndarray, sample: np.ndarray, sigma: np.float32
) -> np.ndarray:
    """x0 from a model output at noise level `sigma`, thresholded if the config asks.

    For the multistep solvers: written in alpha_t and sigma_t, not alphas_cumprod, so that it
    rounds as diffusers' solvers do; they have no clip_sample option.
    """
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    if config["prediction_type"] == "epsilon":
        x0 = (sample - sigma_t * model_output) / alpha_t
    elif config["prediction_type"] == "v_prediction":
        x0 = alpha_t * sample - sigma_t * model_output
    else:
        x0 = model_output
    if config["thresholding"]:
        x0 = limit_predicted_original(x0, {**config, "clip_sample": False})
    return x0


def check_num_inference_steps(config: Mapping[str, Any], num_inference_steps: int) -> None:
    """Refuse a step count the training schedule cannot provide."""
    n_train = int(config["num_train_timesteps"])
    if not 0 < num_inference_steps <= n_train:
        raise ValueError(
            f"num_inference_steps {num_inference_steps} must be between 1 and the "
            f"{n_train} training timesteps; choose a step count in that range"
        )


def vp_lambda(sigma: float) -> tuple[float, float, float]:
    """(lambda, alpha_t, sigma_t) at noise level `sigma`, in float64: lambda = log(alpha_t /
    sigma_t) is the log-SNR time of the multistep solvers, +inf at sigma 0."""
    alpha, sigma_t = vp_alpha_sigma(np.float64(sigma))
    with np.errstate(divide="ignore"):
        return float(np.log(alpha) - np.log(sigma_t)), float(alpha), float(sigma_t)
