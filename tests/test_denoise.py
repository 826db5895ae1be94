"""The per-request loop state: requests stepped together in one U-Net call end where each
ends alone, whatever their schedulers, step counts and guidance."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt import Pipeline
from sdrt.denoise import preview_steps, start_request, step
from sdrt.errors import UserError

REQUESTS = [
    {
        "prompt": "cat",
        "num_inference_steps": 3,
        "guidance_scale": 7.5,
        "scheduler": "ddim",
        "seed": 0,
    },
    {"prompt": ["dog", "fox"], "num_inference_steps": 5, "guidance_scale": 1.0, "seed": 4},
    {
        "prompt": "owl",
        "num_inference_steps": 4,
        "guidance_scale": 3.0,
        "scheduler": "euler_a",
        "seed": 2,
    },
]


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    return Pipeline.load(tiny_bundle, device="cpu")


def test_requests_stepped_together_match_each_run_alone(runtime, monkeypatch):
    unet = runtime.engines["unet"]
    args = [runtime.arguments(**call) for call in REQUESTS]
    states = [
        start_request(runtime, a, c, runtime.guided(a))
        for a, c in zip(args, runtime.conditionings(args), strict=True)
    ]
    batches = []
    run = unet.run
    monkeypatch.setattr(
        unet, "run", lambda feeds: batches.append(len(feeds["sample"])) or run(feeds)
    )
    while any(not s.done for s in states):
        step(unet, [s for s in states if not s.done])
    monkeypatch.setattr(unet, "run", run)
    assert batches[0] == 2 + 2 + 2  # guided, two unguided prompts, guided
    for call, state in zip(REQUESTS, states, strict=True):
        alone = runtime(**call, output_type="np").images
        together = runtime.decode_latents(state.latents)
        assert np.abs(alone - together).max() <= 1e-5


def test_padding_rows_are_dropped(runtime):
    a = runtime.arguments(**REQUESTS[0])
    states = [start_request(runtime, a, c, True) for c in runtime.conditionings([a, a])]
    step(runtime.engines["unet"], states[:1], pad_to=5)
    step(runtime.engines["unet"], states[1:])
    assert np.abs(states[0].latents - states[1].latents).max() <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"guidance_scale": "7"}, "guidance_scale must be a finite number"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"num_inference_steps": True}, "num_inference_steps must be an integer"),
        ({"height": 64.0}, "height must be a positive multiple of 16"),
    ],
)
def test_arguments_refuse_bad_values_in_one_sentence(runtime, kwargs, message):
    with pytest.raises(UserError, match=message):
        runtime.arguments(**{"prompt": "cat", **kwargs})


def test_preview_steps_are_evenly_spaced_inside_the_run_and_fewer_when_it_is_short():
    assert preview_steps(12, 3) == {3, 6, 9}
    assert preview_steps(20, 1) == {10}
    assert preview_steps(2, 3) == {1}  # never the first state nor the finished image
    assert preview_steps(1, 3) == frozenset() and preview_steps(30, 0) == frozenset()
