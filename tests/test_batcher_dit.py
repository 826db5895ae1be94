"""The batcher runs diffusion transformers step by step like U-Nets: requests of one size share
each transformer call (per-row timestep, pooled projections and, for Flux-dev, guidance), and
each seeded request's image equals Pipeline(...) alone."""

from __future__ import annotations

import numpy as np
import pytest
from test_pipeline_variants import random_image

from sdrt import Pipeline
from sdrt.serve import Batcher

REQUESTS = {
    "tiny-sd3": [
        {"prompt": "cat", "num_inference_steps": 3, "guidance_scale": 4.5},
        {"prompt": "dog", "num_inference_steps": 5, "guidance_scale": 1.0},  # one row
        {"prompt": ["fox", "owl"], "negative_prompt": "fog", "num_inference_steps": 4},
        {"prompt": "eel", "num_inference_steps": 4, "image": random_image(5), "strength": 0.7},
        {"prompt": "bee", "num_inference_steps": 3, "height": 64, "width": 96},
    ],
    "tiny-flux": [
        {"prompt": "cat", "num_inference_steps": 3, "guidance_scale": 3.5},
        {"prompt": "dog", "num_inference_steps": 5, "guidance_scale": 1.0},
        {"prompt": ["fox", "owl"], "num_inference_steps": 4, "guidance_scale": 6.0},
        {"prompt": "eel", "num_inference_steps": 4, "image": random_image(5), "strength": 0.7},
        {"prompt": "bee", "num_inference_steps": 3, "height": 64, "width": 96},
    ],
}


@pytest.mark.parametrize("preset", sorted(REQUESTS))
def test_batched_transformer_requests_equal_pipeline_alone(preset_bundle, preset):
    runtime = Pipeline.load(preset_bundle(preset)[1], device="cpu")
    batcher = Batcher(runtime, max_batch_rows=16)
    calls = [
        {**call, "seed": seed, "output_type": "np"} for seed, call in enumerate(REQUESTS[preset])
    ]
    futures = [batcher.submit(call) for call in calls]  # queued before start: admitted together
    batcher.start()
    outputs = [f.result(timeout=300) for f in futures]
    batcher.stop()
    for call, out in zip(calls, outputs, strict=True):
        alone = runtime(**call).images
        assert out.images.shape == alone.shape
        assert np.abs(out.images - alone).max() <= 1e-5
    stats = batcher.stats()
    assert max(stats.requests_per_call) == 4  # the four 64x64 requests shared a call
    assert stats.completed == len(calls)
