"""The numpy DDIM, DDPM, PNDM, LCM, Euler and Euler ancestral schedulers step for step against
the diffusers schedulers of the same name, fed identical model outputs and identical noise."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers import (
    scheduling_ddpm,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
)
from scheduler_parity import SD15_PNDM_CONFIG, SD_CONFIG

from sdrt.schedulers import SCHEDULERS, make_scheduler
from sdrt.schedulers.common import index_for_timestep

# An SD 2.x-style DDIM config with options foreign to most other classes.
SD2_DDIM_CONFIG = {
    **SD_CONFIG,
    "_class_name": "DDIMScheduler",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "use_karras_sigmas": True,  # honoured by euler, ignored by the classes without the option
}

DIFFUSERS_CLASSES = {
    "ddim": diffusers.DDIMScheduler,
    "ddpm": diffusers.DDPMScheduler,
    "pndm": diffusers.PNDMScheduler,
    "lcm": diffusers.LCMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_karras": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
}
NAMES = list(DIFFUSERS_CLASSES)
# Where each stochastic diffusers scheduler draws its noise, so the test can hand it ours.
RANDN_MODULES = {
    "ddpm": scheduling_ddpm,
    "lcm": scheduling_lcm,
    "euler_a": scheduling_euler_ancestral_discrete,
}
SHAPE = (2, 4, 8, 8)  # a batch of two, so per-sample thresholding is exercised
# Two float32 implementations drift apart by rounding alone, and denoising amplifies early
# rounding up to 1/sqrt(alphas_cumprod[-1]) (~15x for SD): whole runs agree to about 5e-6.
ATOL = 1e-5
TARGET = (0.8 * np.random.default_rng(7).standard_normal(SHAPE)).astype(np.float32)


def fake_model(model_input: np.ndarray, timestep: float, alpha_prod: float, prediction_type: str):
    """A deterministic stand-in for the UNet, a function of its input and timestep.

    It believes the clean latent is TARGET plus a timestep-dependent error, and answers in the
    configured parameterisation, so samples stay at realistic magnitudes along the trajectory.
    `model_input` is the variance-preserving x_t every scheduler hands its model.
    """
    rng = np.random.default_rng(int(round(float(timestep) * 1000)) % 2**32)
    x0 = TARGET + 0.1 * rng.standard_normal(SHAPE)
    if prediction_type == "sample":
        return x0.astype(np.float32)
    eps = (model_input - alpha_prod**0.5 * x0) / (1 - alpha_prod) ** 0.5
    if prediction_type == "epsilon":
        return eps.astype(np.float32)
    return (alpha_prod**0.5 * eps - (1 - alpha_prod) ** 0.5 * x0).astype(np.float32)


def noise_level(theirs, config: dict):
    """alphas_cumprod at any (fractional) timestep of `theirs`, for the fake model."""
    alphas_cumprod = theirs.alphas_cumprod.numpy().astype(np.float64)
    continuous = config.get("timestep_type") == "continuous"

    def alpha_at(timestep: float) -> float:
        if continuous:  # the timestep is log(sigma) / 4
            return 1 / (1 + np.exp(4 * float(timestep)) ** 2)
        return float(np.interp(float(timestep), np.arange(len(alphas_cumprod)), alphas_cumprod))

    return alpha_at


def build_pair(name: str, config: dict):
    """Ours by registry name, and diffusers' class of the same name via from_config."""
    overrides = SCHEDULERS[name][2]
    return make_scheduler(name, config), DIFFUSERS_CLASSES[name].from_config(
        {**config, **overrides}
    )


def assert_close(ours: np.ndarray, theirs: torch.Tensor, what: str, atol: float = ATOL) -> None:
    theirs = theirs.numpy()
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    assert ours.shape == theirs.shape, what
    diff = float(np.abs(ours - theirs).max())
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol:.3g}"


def assert_same_timesteps(ours: np.ndarray, theirs: torch.Tensor) -> None:
    theirs = theirs.numpy()
    assert ours.shape == theirs.shape
    if np.issubdtype(theirs.dtype, np.integer):
        np.testing.assert_array_equal(ours, theirs)
    else:  # fractional timesteps (karras) come from interpolating sigmas; float32 precision
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-4)


def run_both(
    name: str,
    config: dict,
    monkeypatch: pytest.MonkeyPatch,
    steps: int = 25,
    begin: int = 0,
    atol: float = ATOL,
) -> None:
    """Denoise with both schedulers from timesteps[begin:], comparing every intermediate."""
    ours, theirs = build_pair(name, config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert_same_timesteps(ours.timesteps, theirs.timesteps)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    alpha_at = noise_level(theirs, config)

    current_noise = {}
    if name in RANDN_MODULES:
        monkeypatch.setattr(
            RANDN_MODULES[name],
            "randn_tensor",
            lambda shape, **kwargs: torch.from_numpy(current_noise["noise"].copy()),
        )

    rng = np.random.default_rng(0)
    if begin:
        # img2img: noise a clean latent to the first timestep run, as the pipelines do.
        ours.set_begin_index(begin)
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(begin)
        clean = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        x_ours = ours.add_noise(clean, noise, ours.timesteps[begin])
        x_theirs = theirs.add_noise(
            torch.from_numpy(clean), torch.from_numpy(noise), theirs.timesteps[begin : begin + 1]
        )
        assert_close(x_ours, x_theirs, "add_noise", atol)
    else:
        x_ours = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(np.float32)
        x_theirs = torch.from_numpy(x_ours.copy())

    schedule = zip(ours.timesteps[begin:], theirs.timesteps[begin:], strict=True)
    for i, (t_ours, t_theirs) in enumerate(schedule):
        scaled = ours.scale_model_input(x_ours, t_ours)
        assert_close(scaled, theirs.scale_model_input(x_theirs, t_theirs), f"input {i}", atol)
        model_output = fake_model(scaled, t_ours, alpha_at(t_ours), theirs.config.prediction_type)
        current_noise["noise"] = rng.standard_normal(SHAPE).astype(np.float32)
        noise = current_noise["noise"] if ours.stochastic else None
        x_ours = ours.step(model_output, t_ours, x_ours, noise=noise)
        x_theirs = theirs.step(torch.from_numpy(model_output), t_theirs, x_theirs).prev_sample
        assert_close(x_ours, x_theirs, f"step {i} (t={t_ours})", atol)
    assert np.isfinite(x_ours).all()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NAMES)
def test_every_step_matches_diffusers(name, prediction_type, spacing, monkeypatch):
    config = {**SD_CONFIG, "prediction_type": prediction_type, "timestep_spacing": spacing}
    run_both(name, config, monkeypatch)


@pytest.mark.parametrize("config", [SD15_PNDM_CONFIG, SD2_DDIM_CONFIG], ids=["sd15", "sd2"])
@pytest.mark.parametrize("name", NAMES)
def test_another_class_config_is_read_like_from_config(name, config, monkeypatch):
    run_both(name, config, monkeypatch, steps=10)


@pytest.mark.parametrize("begin", [1, 4])
@pytest.mark.parametrize("name", NAMES)
def test_schedule_entered_part_way_matches_diffusers_img2img(name, begin, monkeypatch):
    run_both(name, {**SD_CONFIG, "timestep_spacing": "trailing"}, monkeypatch, 10, begin)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_diffusers_at_any_scheduled_timestep(name):
    ours, theirs = build_pair(name, SD_CONFIG)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    rng = np.random.default_rng(1)
    clean = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    for k in (0, 5, len(ours.timesteps) - 1):
        noisy = ours.add_noise(clean, noise, ours.timesteps[k])
        expected = theirs.add_noise(
            torch.from_numpy(clean), torch.from_numpy(noise), theirs.timesteps[k : k + 1]
        )
        assert_close(noisy, expected, f"add_noise at index {k}")


# Each family's own options, beyond prediction type and spacing.
OPTION_CASES = [
    ("ddim", {"prediction_type": "sample"}),
    ("ddim", {"set_alpha_to_one": False, "clip_sample": True, "clip_sample_range": 0.5}),
    ("ddim", {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}),
    ("ddim", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
    ("ddim", {"beta_schedule": "squaredcos_cap_v2"}),
    ("ddpm", {"prediction_type": "sample", "clip_sample": False}),
    ("ddpm", {"variance_type": "fixed_small_log"}),
    ("ddpm", {"variance_type": "fixed_large", "thresholding": True}),
    ("ddpm", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("pndm", {"skip_prk_steps": False}),
    ("pndm", {"skip_prk_steps": False, "prediction_type": "v_prediction"}),
    ("pndm", {"skip_prk_steps": True, "set_alpha_to_one": True}),
    ("pndm", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),  # ignored
    ("lcm", {"original_inference_steps": 100, "timestep_scaling": 5.0}),
    # A small scaling makes the boundary condition's c_skip matter (it is ~1e-5 at 10).
    ("lcm", {"timestep_scaling": 0.05}),
    ("lcm", {"prediction_type": "sample", "clip_sample": True}),
    ("lcm", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
    ("euler", {"prediction_type": "sample"}),
    ("euler", {"final_sigmas_type": "sigma_min"}),
    ("euler", {"interpolation_type": "log_linear"}),
    ("euler", {"use_exponential_sigmas": True}),
    ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
    ("euler_karras", {"timestep_spacing": "leading", "final_sigmas_type": "sigma_min"}),
]


@pytest.mark.parametrize(("name", "options"), OPTION_CASES)
def test_family_options_match_diffusers(name, options, monkeypatch):
    run_both(name, {**SD_CONFIG, **options}, monkeypatch, steps=10)


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_zero_terminal_snr_sigma_schedules_match_to_float32_precision(name, monkeypatch):
    # sigma_max is 4096 here, so samples are that large: compare relative to that scale.
    config = {
        **SD_CONFIG,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
    }
    run_both(name, config, monkeypatch, steps=10, atol=4096 * 1e-6)


def test_euler_karras_is_euler_with_karras_sigmas():
    plain = make_scheduler("euler", SD_CONFIG)
    karras = make_scheduler("euler_karras", SD_CONFIG)
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert karras.sigmas[0] == pytest.approx(plain.sigmas[0])
    assert karras.sigmas[-2] == pytest.approx(plain.sigmas[-2])
    # Same end points, but Karras spacing crowds the steps towards the small sigmas.
    assert karras.sigmas[-3] < 0.5 * plain.sigmas[-3]


def test_a_repeated_timestep_resolves_to_its_second_occurrence():
    # Entering a schedule part-way on a repeated timestep must not skip a sigma (diffusers).
    assert index_for_timestep(np.array([999.0, 500.0, 500.0, 0.0]), 500.0) == 2
    assert index_for_timestep(np.array([999.0, 500.0, 0.0]), 500.0) == 1
    with pytest.raises(ValueError, match="not in this schedule"):
        index_for_timestep(np.array([999.0, 0.0]), 500.0)


def test_unknown_scheduler_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        make_scheduler("nope", SD_CONFIG)


@pytest.mark.parametrize("name", ["ddpm", "lcm", "euler_a"])
def test_stochastic_step_without_noise_is_a_value_error(name):
    scheduler = make_scheduler(name, SD_CONFIG)
    scheduler.set_timesteps(4)
    assert scheduler.stochastic
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="noise"):
        scheduler.step(x, scheduler.timesteps[0], x)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("pndm", {"prediction_type": "sample"}),
        ("euler_a", {"prediction_type": "sample"}),
        ("ddpm", {"variance_type": "learned_range"}),
        ("euler", {"use_beta_sigmas": True}),
        ("ddim", {"timestep_spacing": "sideways"}),
    ],
)
def test_unsupported_options_are_value_errors_at_construction(name, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        make_scheduler(name, {**SD_CONFIG, **options})


@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm", "euler", "euler_a"])
@pytest.mark.parametrize("steps", [0, 1001])
def test_a_step_count_outside_the_training_schedule_is_a_value_error(name, steps):
    with pytest.raises(ValueError, match=f"num_inference_steps {steps}"):
        make_scheduler(name, SD_CONFIG).set_timesteps(steps)


def test_lcm_refuses_more_steps_than_it_was_distilled_on():
    scheduler = make_scheduler("lcm", {**SD_CONFIG, "original_inference_steps": 8})
    with pytest.raises(ValueError, match="original_inference_steps"):
        scheduler.set_timesteps(9)
