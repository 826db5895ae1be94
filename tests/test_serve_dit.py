"""`sdrt serve` with diffusion-transformer bundles, as a real process on 127.0.0.1 with the
openai client: SD3 and Flux bundles served side by side, each image equal to Pipeline alone,
concurrent requests sharing transformer calls."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_serve import alone, metric, pixels, png

from sdrt import Pipeline
from sdrt.benchmarks.serve_process import ServeProcess

KEY = "test-key"
PRESETS = ("tiny-sd3", "tiny-flux")


@pytest.fixture(scope="module")
def bundles(preset_bundle):
    return {preset: preset_bundle(preset)[1] for preset in PRESETS}


@pytest.fixture(scope="module")
def server(bundles):
    process = ServeProcess(list(bundles.values()), ["--api-key", KEY]).start()
    yield process
    assert process.stop() == 0


def test_openai_client_gets_each_transformer_bundles_image(server, bundles):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    assert sorted(m.id for m in client.models.list()) == sorted(PRESETS)
    for preset, bundle in bundles.items():
        runtime = Pipeline.load(bundle, device="cpu")
        fields = {"num_inference_steps": 3, "seed": 7, "guidance_scale": 3.5}
        made = client.images.generate(
            model=preset, prompt="a red cat", size="96x64", response_format="b64_json",
            extra_body=fields,
        )  # fmt: skip
        expected = alone(runtime, prompt="a red cat", height=64, width=96, **fields)
        assert np.abs(pixels(png(made.data[0].b64_json)) - expected).max() <= 1


def test_concurrent_flux_requests_share_transformer_calls(server, bundles):
    import httpx

    runtime = Pipeline.load(bundles["tiny-flux"], device="cpu")
    # enough requests and steps that they overlap in the server even on a loaded machine
    mixed = [
        {"seed": i, "num_inference_steps": 20 + 5 * (i % 3), "guidance_scale": 1.0 + i}
        for i in range(6)
    ]
    calls_before = metric(server, "sdrt_unet_call_seconds_count")
    barrier = threading.Barrier(len(mixed))

    def request(fields):
        barrier.wait()
        body = {"model": "tiny-flux", "prompt": "a fox", "size": "64x64", **fields}
        headers = {"Authorization": f"Bearer {KEY}"}
        return httpx.post(
            f"{server.url}/v1/images/generations", json=body, headers=headers, timeout=120
        )

    with ThreadPoolExecutor(len(mixed)) as pool:
        responses = list(pool.map(request, mixed))
    for fields, response in zip(mixed, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = alone(runtime, prompt="a fox", height=64, width=64, **fields)
        assert np.abs(pixels(png(response.json()["data"][0]["b64_json"])) - expected).max() <= 1
    calls = metric(server, "sdrt_unet_call_seconds_count") - calls_before
    assert calls < sum(f["num_inference_steps"] for f in mixed)  # some calls were shared
