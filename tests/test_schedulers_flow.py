"""The numpy flow-matching schedulers (SD3/3.5, Flux.1) step for step against diffusers'
FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler, on identical velocities."""

from __future__ import annotations

import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from sdrt.schedulers import FLOW_SCHEDULERS, SCHEDULERS, compatible_schedulers, make_scheduler
from sdrt.schedulers.flow_match import dynamic_shift_mu, flux_sigmas

# The published scheduler_config.json of each family (the keys that matter).
SD3_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
FLUX_DEV_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
DIFFUSERS_CLASSES = {
    "flow_match_euler": diffusers.FlowMatchEulerDiscreteScheduler,
    "flow_match_heun": diffusers.FlowMatchHeunDiscreteScheduler,
}
SHAPE = (2, 16, 8, 8)
TARGET = np.random.default_rng(7).standard_normal(SHAPE)
# The project's parity bounds. Measured over this file's runs: 0.0 in both precisions (the
# same operations in the same order and dtypes), so any slip in the formulas shows.
ATOL = {np.float32: 1e-5, np.float64: 1e-6}
FLUX_MU = dynamic_shift_mu(64 * 64, FLUX_DEV_CONFIG)  # a 1024x1024 Flux image: 4096 tokens


def fake_velocity(sample: np.ndarray, timestep: float) -> np.ndarray:
    """A deterministic stand-in for the transformer: the velocity noise - x0 towards a clean
    latent near TARGET, with a timestep-dependent error, so samples stay realistic."""
    rng = np.random.default_rng(int(round(float(timestep) * 1000)) % 2**32)
    x0 = TARGET + 0.1 * rng.standard_normal(SHAPE)
    sigma = float(timestep) / 1000
    noise = (sample - (1 - sigma) * x0) / max(sigma, 1e-3)
    return (noise - x0).astype(sample.dtype)


def build_pair(name: str, config: dict):
    return make_scheduler(name, config), DIFFUSERS_CLASSES[name].from_config(config)


def set_both(ours, theirs, steps: int, **schedule) -> None:
    """The same schedule on both, custom sigmas and mu passed as Flux's pipeline passes them."""
    ours.set_timesteps(steps, **schedule)
    theirs.set_timesteps(steps, **schedule)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, theirs.sigmas.numpy())


def assert_close(ours: np.ndarray, theirs: torch.Tensor, what: str, dtype) -> None:
    theirs = theirs.numpy()
    assert ours.dtype == dtype == theirs.dtype, f"{what}: dtype {ours.dtype}"
    diff = float(np.abs(ours - theirs).max())
    assert diff <= ATOL[dtype], f"{what}: max abs diff {diff:.3g} > {ATOL[dtype]:.3g}"


def run_both(name, config, steps, dtype=np.float32, begin=0, **schedule) -> None:
    """Denoise with both from timesteps[begin:] (img2img: the clean latent noised to the first
    timestep run, as the SD3 and Flux img2img pipelines do), comparing every step."""
    ours, theirs = build_pair(name, config)
    set_both(ours, theirs, steps, **schedule)
    assert ours.order == theirs.order
    assert ours.init_noise_sigma == 1.0  # diffusers' flow pipelines start from unscaled noise
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SHAPE).astype(dtype)
    if begin:
        ours.set_begin_index(begin)
        theirs.set_begin_index(begin)
        clean = rng.standard_normal(SHAPE).astype(dtype)
        x_ours = ours.add_noise(clean, noise, ours.timesteps[begin])
        x_theirs = theirs.scale_noise(
            torch.from_numpy(clean), theirs.timesteps[begin : begin + 1], torch.from_numpy(noise)
        )
        assert_close(x_ours, x_theirs, "scale_noise", dtype)
    else:
        x_ours, x_theirs = noise, torch.from_numpy(noise.copy())
    schedule_pairs = zip(ours.timesteps[begin:], theirs.timesteps[begin:], strict=True)
    for i, (t_ours, t_theirs) in enumerate(schedule_pairs):
        assert ours.scale_model_input(x_ours, t_ours) is x_ours
        velocity = fake_velocity(x_ours, t_ours)
        x_ours = ours.step(velocity, t_ours, x_ours)
        x_theirs = theirs.step(torch.from_numpy(velocity), t_theirs, x_theirs).prev_sample
        assert_close(x_ours, x_theirs, f"step {i} (t={t_ours})", dtype)
    assert np.isfinite(x_ours).all()


STEP_COUNTS = [1, 4, 28, 50]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_sd3_shifted_schedule_matches_diffusers(steps, dtype):
    run_both("flow_match_euler", SD3_CONFIG, steps, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_flux_dev_dynamic_shift_with_custom_sigmas_matches_diffusers(steps, dtype):
    run_both(
        "flow_match_euler", FLUX_DEV_CONFIG, steps, dtype, sigmas=flux_sigmas(steps), mu=FLUX_MU
    )


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_dynamic_shift_without_custom_sigmas_matches_diffusers(steps):
    run_both("flow_match_euler", FLUX_DEV_CONFIG, steps, mu=dynamic_shift_mu(1024, FLUX_DEV_CONFIG))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flux_schnell_schedule_matches_diffusers(steps):
    # Flux's pipeline passes custom sigmas and mu to every config; schnell's ignores mu.
    run_both("flow_match_euler", FLUX_SCHNELL_CONFIG, steps, sigmas=flux_sigmas(steps), mu=FLUX_MU)


@pytest.mark.parametrize(
    "options",
    [
        {"time_shift_type": "linear"},
        {"shift_terminal": 0.1},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"invert_sigmas": True},
    ],
    ids=lambda options: next(iter(options)),
)
def test_schedule_options_match_diffusers(options):
    config = {**FLUX_DEV_CONFIG, **options}
    run_both("flow_match_euler", config, 10, sigmas=flux_sigmas(10), mu=FLUX_MU)
    if "time_shift_type" not in options:
        run_both("flow_match_euler", {**SD3_CONFIG, **options}, 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("begin", [1, 7])
def test_img2img_start_matches_diffusers_scale_noise(begin, dtype):
    run_both("flow_match_euler", SD3_CONFIG, 10, dtype, begin=begin)
    schedule = {"sigmas": flux_sigmas(10), "mu": FLUX_MU}
    run_both("flow_match_euler", FLUX_DEV_CONFIG, 10, dtype, begin=begin, **schedule)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_heun_matches_diffusers(steps, dtype):
    run_both("flow_match_heun", SD3_CONFIG, steps, dtype)


@pytest.mark.parametrize("begin", [2, 5])
def test_heun_img2img_start_matches_diffusers(begin):
    run_both("flow_match_heun", SD3_CONFIG, 6, begin=begin)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_noise_rounds_like_diffusers_at_every_timestep(dtype):
    # 1 - sigma is taken in the sample's precision: in float32 it rounds for some sigmas (3e-8),
    # which the trajectory tolerance would hide; at every index the two agree exactly.
    ours, theirs = build_pair("flow_match_euler", SD3_CONFIG)
    set_both(ours, theirs, 28)
    rng = np.random.default_rng(3)
    clean, noise = (100 * rng.standard_normal((2, *SHAPE))).astype(dtype)
    for k, t in enumerate(ours.timesteps):
        expected = theirs.scale_noise(
            torch.from_numpy(clean), theirs.timesteps[k : k + 1], torch.from_numpy(noise)
        )
        np.testing.assert_array_equal(ours.add_noise(clean, noise, t), expected.numpy())


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 4096 * 2, 333])
@pytest.mark.parametrize("config", [FLUX_DEV_CONFIG, {}], ids=["flux-dev", "defaults"])
def test_mu_is_diffusers_calculate_shift(image_seq_len, config):
    expected = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    assert dynamic_shift_mu(image_seq_len, config) == expected


def test_flux_sigmas_are_the_pipelines():
    np.testing.assert_array_equal(flux_sigmas(4), [1.0, 0.75, 0.5, 0.25])


def test_add_noise_inpainting_renoise_uses_the_current_step_like_diffusers():
    # Once stepping started with a begin index, diffusers noises at the current step's sigma.
    ours, theirs = build_pair("flow_match_euler", SD3_CONFIG)
    set_both(ours, theirs, 10)
    ours.set_begin_index(3)
    theirs.set_begin_index(3)
    x = np.ones(SHAPE, np.float32)
    ours.step(x, ours.timesteps[3], x)
    theirs.step(torch.from_numpy(x), theirs.timesteps[3], torch.from_numpy(x))
    clean, noise = np.zeros(SHAPE, np.float32), np.ones(SHAPE, np.float32)
    expected = theirs.scale_noise(
        torch.from_numpy(clean), theirs.timesteps[5:6], torch.from_numpy(noise)
    )
    assert_close(ours.add_noise(clean, noise, ours.timesteps[5]), expected, "renoise", np.float32)


def test_flow_names_are_registered_and_marked():
    assert sorted(FLOW_SCHEDULERS) == ["flow_match_euler", "flow_match_heun"]
    assert all(name in SCHEDULERS for name in FLOW_SCHEDULERS)
    assert not make_scheduler("flow_match_euler", SD3_CONFIG).stochastic


def test_dynamic_shifting_without_mu_is_a_value_error():
    scheduler = make_scheduler("flow_match_euler", FLUX_DEV_CONFIG)
    with pytest.raises(ValueError, match="pass mu"):
        scheduler.set_timesteps(4)


def test_custom_sigmas_of_the_wrong_length_are_a_value_error():
    scheduler = make_scheduler("flow_match_euler", FLUX_SCHNELL_CONFIG)
    with pytest.raises(ValueError, match="3 sigmas for 4 inference steps"):
        scheduler.set_timesteps(4, sigmas=flux_sigmas(3))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("flow_match_euler", {"use_beta_sigmas": True}),
        ("flow_match_euler", {"stochastic_sampling": True}),
        ("flow_match_euler", {"time_shift_type": "cubic"}),
        ("flow_match_heun", {"use_dynamic_shifting": True}),
    ],
)
def test_unsupported_options_are_refused_by_name(name, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        make_scheduler(name, {**SD3_CONFIG, **options})


def test_heun_refuses_a_flux_schedule():
    scheduler = make_scheduler("flow_match_heun", FLUX_SCHNELL_CONFIG)
    with pytest.raises(ValueError, match="use flow_match_euler"):
        scheduler.set_timesteps(4, sigmas=flux_sigmas(4), mu=FLUX_MU)


def test_a_bundle_is_driven_by_the_schedulers_of_its_kind():
    assert compatible_schedulers("flow_match_euler") == ["flow_match_euler", "flow_match_heun"]
    unet = compatible_schedulers("ddim")
    assert "euler" in unet and not FLOW_SCHEDULERS & set(unet)


def test_the_flow_schedulers_import_no_torch_diffusers_or_scipy():
    code = (
        "import sys, sdrt.schedulers.flow_match; "
        "print(sorted({'torch', 'diffusers', 'scipy'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(FLOW_SCHEDULERS))
@pytest.mark.parametrize("steps", [0, 1001])
def test_a_step_count_outside_the_training_schedule_is_a_value_error(name, steps):
    with pytest.raises(ValueError, match=f"num_inference_steps {steps}"):
        make_scheduler(name, SD3_CONFIG).set_timesteps(steps)
