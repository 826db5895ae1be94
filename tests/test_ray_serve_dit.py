"""sdrt.serve.ray with an SD3 bundle: one replica on a local Ray, through Ray's HTTP proxy on
127.0.0.1; a seeded request equals Pipeline alone."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from ray import serve
from test_ray_serve import APP, _generate, _pixels, _wait_ready

from sdrt import Pipeline
from sdrt.benchmarks.serve_process import free_port
from sdrt.serve.ray import ReplicaConfig, build, deployment_options


@pytest.fixture(scope="module")
def sd3_ray_url(preset_bundle):
    ray.init(num_cpus=1, object_store_memory=100 * 2**20, include_dashboard=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = deployment_options(replicas=1, cpus_per_replica=1)
        bundle = str(preset_bundle("tiny-sd3")[1])
        serve.run(build(ReplicaConfig(bundles=(bundle,)), options), name=APP)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_sd3_request_through_ray_equals_pipeline(sd3_ray_url, preset_bundle):
    fields = {"seed": 4, "num_inference_steps": 3, "guidance_scale": 4.5}
    response = _generate(sd3_ray_url, negative_prompt="fog", **fields)
    assert response.status_code == 200, response.text
    runtime = Pipeline.load(preset_bundle("tiny-sd3")[1], device="cpu")
    alone = runtime("a fox", negative_prompt="fog", output_type="np", **fields).images[0]
    assert np.abs(_pixels(response) - alone * 255.0).max() <= 1  # PNG rounding
