"""`predicted_clean` (the x0 a streamed preview shows) equals diffusers' `pred_original_sample`
for every parameterisation, on an alpha family (DDIM), a sigma family (Euler, with Karras
fractional timesteps) and LMS, at every step of a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler
from scheduler_parity import SD_CONFIG

from sdrt.schedulers import make_scheduler, predicted_clean

CASES = [
    ("ddim", DDIMScheduler, {"clip_sample": False}),  # as SD configs; previews never clip
    ("euler", EulerDiscreteScheduler, {}),
    ("euler_karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    ("lms", LMSDiscreteScheduler, {}),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(("name", "reference", "options"), CASES)
def test_predicted_clean_matches_diffusers_pred_original_sample(
    name, reference, options, prediction_type
):
    config = {**SD_CONFIG, **options, "prediction_type": prediction_type}
    ours = make_scheduler(name, config)
    theirs = reference.from_config(config)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32) * np.float32(
        ours.init_noise_sigma
    )
    worst = 0.0
    for t in ours.timesteps:
        model_input = ours.scale_model_input(sample, t)
        output = rng.standard_normal(sample.shape).astype(np.float32)
        x0 = predicted_clean(ours.config, model_input, output, t)
        theirs.scale_model_input(torch.from_numpy(sample), torch.tensor(t))
        step = theirs.step(torch.from_numpy(output), torch.tensor(t), torch.from_numpy(sample))
        expected = step.pred_original_sample.numpy()
        worst = max(worst, float(np.abs(x0 - expected).max() / np.abs(expected).max()))
        sample = ours.step(output, t, sample)
    assert worst <= 1e-5, worst  # measured at most 2.5e-6


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_predicted_clean_is_where_diffusers_step_to_sigma_zero_lands(shift):
    """A flow step to sigma 0 (diffusers' last) lands on x0; there its prev_sample is x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {"num_train_timesteps": 1000, "shift": shift}
    theirs = FlowMatchEulerDiscreteScheduler.from_config(config)
    theirs.set_timesteps(6)
    rng = np.random.default_rng(1)
    sample = torch.from_numpy(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    for t in theirs.timesteps:
        output = torch.from_numpy(rng.standard_normal(sample.shape).astype(np.float32))
        x0 = predicted_clean(config, sample.numpy(), output.numpy(), float(t))
        sample = theirs.step(output, t, sample).prev_sample
    expected = sample.numpy()  # the last step's target sigma is 0
    assert np.abs(x0 - expected).max() <= 1e-5 * np.abs(expected).max()
