"""The numpy DPM-Solver++ (2M, 2M Karras, 2M SDE), UniPC, LMS and Heun schedulers step for step
against the diffusers schedulers of the same name, fed identical model outputs and noise."""

from __future__ import annotations

import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from scheduler_parity import SD15_PNDM_CONFIG, SD_CONFIG

from sdrt.schedulers import SCHEDULERS, make_scheduler

# Raised inside diffusers (np.array of a tensor under numpy 2), not by the code under test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


DPM = diffusers.DPMSolverMultistepScheduler
DIFFUSERS_SCHEDULERS = {
    "dpmpp_2m": (DPM, {}),
    "dpmpp_2m_karras": (DPM, {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": (DPM, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
}
NAMES = list(DIFFUSERS_SCHEDULERS)
TOLERANCE = 1e-5
SHAPE = (1, 4, 8, 8)
TARGET = np.random.default_rng(123).standard_normal(SHAPE).astype(np.float32)


def build_pair(name: str, config: dict):
    """(diffusers, ours) from one config; like make_scheduler, the name's overrides win."""
    if name == "lms":
        pytest.importorskip("scipy", reason="diffusers' LMS needs scipy (ours does not)")
    cls, overrides = DIFFUSERS_SCHEDULERS[name]
    return cls.from_config({**config, **overrides}), make_scheduler(name, config)


def fake_model(scaled_sample: np.ndarray, t: float, prediction_type: str, alphas_cumprod):
    """A deterministic stand-in for the U-Net: an x0 guess near a fixed image that also depends
    on its input, returned in the requested parameterisation, as a real denoiser's would be."""
    abar = np.interp(float(t), np.arange(len(alphas_cumprod)), alphas_cumprod)
    wobble = np.random.default_rng(int(float(t) * 1000)).standard_normal(SHAPE)
    x0 = TARGET + 0.2 * np.tanh(scaled_sample) + 0.05 * wobble
    eps = (scaled_sample - abar**0.5 * x0) / (1 - abar) ** 0.5
    if prediction_type == "epsilon":
        return eps.astype(np.float32)
    if prediction_type == "v_prediction":
        return (abar**0.5 * eps - (1 - abar) ** 0.5 * x0).astype(np.float32)
    return x0.astype(np.float32)


def assert_close(theirs, ours, what: str) -> None:
    theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.dtype == np.float32, f"{what}: {ours.dtype}"
    diff = float(np.abs(theirs - ours).max())
    assert diff <= TOLERANCE, f"{what}: max abs diff {diff:.3g}"


def run_in_lockstep(
    theirs, ours, sample, begin=0, prediction_type="epsilon", last_is_nan=False, stop=None
):
    """Step both through their schedules from index `begin` (to `stop`), from the same sample
    with the same model output (and noise) at every step, so that each step's arithmetic is
    compared on its own. `last_is_nan`: diffusers' final step is known to return NaN."""
    rng = np.random.default_rng(0)
    alphas_cumprod = theirs.alphas_cumprod.numpy().astype(np.float64)
    steps = len(ours.timesteps)
    for i in range(begin, steps if stop is None else stop):
        t, their_t = ours.timesteps[i], theirs.timesteps[i]
        scaled = ours.scale_model_input(sample, t)
        expected = theirs.scale_model_input(torch.from_numpy(sample), their_t)
        assert_close(expected, scaled, f"model input {i}")
        output = fake_model(scaled, t, prediction_type, alphas_cumprod)
        noise = rng.standard_normal(SHAPE).astype(np.float32) if ours.stochastic else None
        extra = {} if noise is None else {"variance_noise": torch.from_numpy(noise)}
        expected = theirs.step(torch.from_numpy(output), their_t, torch.from_numpy(sample), **extra)
        sample = ours.step(output, t, sample, noise=noise)
        if last_is_nan and i == steps - 1:
            assert torch.isnan(expected.prev_sample).any()
        else:
            assert_close(expected.prev_sample, sample, f"step {i} (t={t})")
    assert np.isfinite(sample).all()
    return sample


def start_both(theirs, ours, steps: int) -> np.ndarray:
    """set_timesteps on both, check the schedules agree, and draw the initial latents."""
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    their_timesteps = theirs.timesteps.numpy()
    assert ours.timesteps.dtype == their_timesteps.dtype
    # Fractional (Karras) timesteps may differ in the last float32 bit: torch's x ** 0.5 is not
    # correctly rounded, so the training sigmas they are interpolated from differ by an ulp.
    np.testing.assert_allclose(ours.timesteps, their_timesteps, rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-6, atol=0)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    noise = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    return noise * np.float32(ours.init_noise_sigma)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NAMES)
def test_every_step_matches_diffusers(name, prediction_type, spacing):
    config = {**SD_CONFIG, "prediction_type": prediction_type, "timestep_spacing": spacing}
    theirs, ours = build_pair(name, config)
    sample = start_both(theirs, ours, 10)
    run_in_lockstep(theirs, ours, sample, prediction_type=prediction_type)


@pytest.mark.parametrize("name", NAMES)
def test_a_whole_run_tracks_diffusers(name):
    """Each runs its own 25-step trajectory (the model evaluated on its own sample): the small
    per-step differences do not grow into a visible drift."""
    theirs, ours = build_pair(name, SD_CONFIG)
    ours_sample = start_both(theirs, ours, 25)
    theirs_sample = torch.from_numpy(ours_sample.copy())
    alphas_cumprod = theirs.alphas_cumprod.numpy().astype(np.float64)
    rng = np.random.default_rng(1)
    for t, their_t in zip(ours.timesteps, theirs.timesteps, strict=True):
        theirs_in = theirs.scale_model_input(theirs_sample, their_t).numpy()
        theirs_out = fake_model(theirs_in, their_t, "epsilon", alphas_cumprod)
        ours_out = fake_model(ours.scale_model_input(ours_sample, t), t, "epsilon", alphas_cumprod)
        noise = rng.standard_normal(SHAPE).astype(np.float32) if ours.stochastic else None
        extra = {} if noise is None else {"variance_noise": torch.from_numpy(noise)}
        theirs_sample = theirs.step(
            torch.from_numpy(theirs_out), their_t, theirs_sample, **extra
        ).prev_sample
        ours_sample = ours.step(ours_out, t, ours_sample, noise=noise)
    assert_close(theirs_sample, ours_sample, "final sample")
    assert np.abs(ours_sample - TARGET).max() < 0.5, "the fake model's image was not reached"


@pytest.mark.parametrize(
    ("name", "options", "steps"),
    [
        ("dpmpp_2m", {"solver_order": 3}, 20),
        ("dpmpp_2m", {"solver_order": 3}, 10),
        ("dpmpp_2m", {"solver_order": 1}, 10),
        ("dpmpp_2m", {"solver_type": "heun"}, 10),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 10),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, 10),
        ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}, 20),
        ("dpmpp_2m", {"lower_order_final": False}, 10),
        ("dpmpp_2m", {"prediction_type": "sample", "thresholding": True}, 10),
        ("dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 10),
        ("dpmpp_2m", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10),
        ("dpmpp_2m_karras", {"solver_order": 3, "prediction_type": "v_prediction"}, 20),
        ("dpmpp_2m_karras", {"final_sigmas_type": "sigma_min"}, 20),
        ("dpmpp_2m_sde", {"solver_order": 3}, 20),
        ("dpmpp_2m_sde", {"solver_type": "heun", "use_karras_sigmas": True}, 10),
        ("unipc", {"solver_order": 3}, 20),
        ("unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min"}, 10),
        ("unipc", {"disable_corrector": [0, 3]}, 10),
        ("unipc", {"use_karras_sigmas": True}, 10),
        ("unipc", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 10),
        ("unipc", {"prediction_type": "sample", "solver_type": "bh1"}, 10),
        ("unipc", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 10),
        ("lms", {"use_karras_sigmas": True}, 10),
        ("lms", {"prediction_type": "sample", "timestep_spacing": "leading"}, 10),
        ("heun", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 10),
        ("heun", {"clip_sample": True, "clip_sample_range": 2.0, "prediction_type": "sample"}, 10),
    ],
)
def test_options_match_diffusers(name, options, steps):
    config = {**SD_CONFIG, **options}
    theirs, ours = build_pair(name, config)
    sample = start_both(theirs, ours, steps)
    # diffusers' bh1 UniPC multiplies its infinite B(h) by zero on the step to sigma 0 and ends
    # in NaN; ours leaves out that empty term and ends finite.
    last_is_nan = name == "unipc" and options.get("solver_type") == "bh1"
    prediction_type = config.get("prediction_type", "epsilon")
    run_in_lockstep(theirs, ours, sample, 0, prediction_type, last_is_nan=last_is_nan)


@pytest.mark.parametrize("name", NAMES)
def test_configs_of_other_classes_load_like_from_config(name):
    """SD 1.5's PNDM config as saved, and as diffusers holds it in memory, where the keys it
    filled with PNDM's defaults (timestep_spacing "leading") must give way to the new class's."""
    pndm = diffusers.PNDMScheduler.from_config(SD15_PNDM_CONFIG)
    for config in (SD15_PNDM_CONFIG, dict(pndm.config)):
        theirs, ours = build_pair(name, config)
        sample = start_both(theirs, ours, 10)
        run_in_lockstep(theirs, ours, sample)


@pytest.mark.parametrize("begin", [0, 4, 7])
@pytest.mark.parametrize("name", NAMES)
def test_img2img_from_a_begin_index_matches_diffusers(name, begin):
    """As the img2img pipeline does: begin at index k * order, noise the image to that timestep
    with add_noise, then step through the rest of the schedule."""
    theirs, ours = build_pair(name, SD_CONFIG)
    start_both(theirs, ours, 10)
    begin_index = begin * ours.order
    theirs.set_begin_index(begin_index)
    ours.set_begin_index(begin_index)
    rng = np.random.default_rng(3)
    image = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    expected = theirs.add_noise(
        torch.from_numpy(image),
        torch.from_numpy(noise),
        theirs.timesteps[begin_index : begin_index + 1],
    )
    sample = ours.add_noise(image, noise, ours.timesteps[begin_index])
    assert_close(expected, sample, "add_noise")
    run_in_lockstep(theirs, ours, sample, begin_index)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_mid_run_uses_the_current_step_like_inpainting(name):
    """Inpainting re-noises the known region after each step: the sigma is then the current
    step's, whatever timestep is passed."""
    theirs, ours = build_pair(name, SD_CONFIG)
    sample = start_both(theirs, ours, 10)
    theirs.set_begin_index(2 * ours.order)
    ours.set_begin_index(2 * ours.order)
    run_in_lockstep(theirs, ours, sample, 2 * ours.order, stop=3 * ours.order)
    image = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    noise = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    expected = theirs.add_noise(
        torch.from_numpy(image), torch.from_numpy(noise), theirs.timesteps[:1]
    )
    assert_close(expected, ours.add_noise(image, noise, ours.timesteps[0]), "add_noise mid-run")


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_without_begin_index_looks_the_timestep_up(name):
    theirs, ours = build_pair(name, SD_CONFIG)
    start_both(theirs, ours, 10)
    image = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    noise = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    for i in range(0, len(ours.timesteps), 3):
        expected = theirs.add_noise(
            torch.from_numpy(image), torch.from_numpy(noise), theirs.timesteps[i : i + 1]
        )
        assert_close(expected, ours.add_noise(image, noise, ours.timesteps[i]), f"add_noise {i}")
    with pytest.raises(ValueError, match="not in this schedule"):
        ours.add_noise(image, noise, 12345)


def test_heun_lists_each_timestep_after_the_first_twice():
    ours = make_scheduler("heun", SD_CONFIG)
    ours.set_timesteps(5)
    once = ours.timesteps[::2]
    assert len(ours.timesteps) == 2 * 5 - 1
    np.testing.assert_array_equal(ours.timesteps[1::2], ours.timesteps[2::2])
    assert np.all(np.diff(once) < 0)


def test_only_the_sde_solver_is_stochastic_and_it_demands_noise():
    assert [n for n in NAMES if make_scheduler(n, SD_CONFIG).stochastic] == ["dpmpp_2m_sde"]
    sde = make_scheduler("dpmpp_2m_sde", SD_CONFIG)
    sde.set_timesteps(10)
    sample = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="noise"):
        sde.step(sample, sde.timesteps[0], sample)


def test_lms_weights_integrate_the_lagrange_basis_exactly():
    """The four weights of a step sum to the step in sigma (the basis sums to one), and each
    matches scipy's numerical integral, which diffusers uses."""
    integrate = pytest.importorskip("scipy.integrate")
    lms = make_scheduler("lms", SD_CONFIG)
    lms.set_timesteps(10)
    t, sigmas = 5, lms.sigmas.astype(np.float64)
    weights = [lms._coefficient(4, t, j) for j in range(4)]
    assert sum(weights) == pytest.approx(sigmas[t + 1] - sigmas[t], rel=1e-12)
    for j, weight in enumerate(weights):
        others = [sigmas[t - k] for k in range(4) if k != j]

        def basis(tau, j=j, others=others):
            return np.prod([(tau - o) / (sigmas[t - j] - o) for o in others])

        assert weight == pytest.approx(integrate.quad(basis, sigmas[t], sigmas[t + 1])[0])


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("dpmpp_2m", {"use_lu_lambdas": True}),
        ("dpmpp_2m", {"algorithm_type": "dpmsolver"}),
        ("dpmpp_2m", {"solver_order": 4}),
        ("unipc", {"use_flow_sigmas": True}),
        ("unipc", {"lower_order_final": False}),  # diffusers returns NaN at the last step
        ("lms", {"use_exponential_sigmas": True}),
        ("heun", {"use_beta_sigmas": True}),
        ("heun", {"prediction_type": "flow_prediction"}),
    ],
)
def test_unsupported_options_are_refused_by_name(name, options):
    key = next(iter(options))
    with pytest.raises(ValueError, match=key):
        make_scheduler(name, {**SD_CONFIG, **options})


def test_the_schedulers_import_neither_torch_nor_scipy():
    modules = ", ".join(f"sdrt.schedulers.{SCHEDULERS[n][0]}" for n in NAMES)
    code = f"import sys, {modules}; print(sorted({{'torch', 'scipy'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
