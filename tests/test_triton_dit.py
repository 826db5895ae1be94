"""The Triton repository serves a Flux bundle (a real `tritonserver` on 127.0.0.1, CPU):
requests with different guidance share transformer calls and equal Pipeline alone."""

from __future__ import annotations

import numpy as np
import pytest
from test_triton import MODEL, _inputs, _metric, _stream

from sdrt import Pipeline
from sdrt.serve.triton_repo import RepoOptions, write_repository

REQUESTS = [("a red bicycle", 3, 3.5, 1), ("a blue house", 4, 6.0, 2), ("a cat", 2, 1.0, 3)]


@pytest.fixture(scope="module")
def flux_triton(preset_bundle, tmp_path_factory):
    from sdrt.benchmarks.tritonserver import TritonServer, triton_venv

    repo = tmp_path_factory.mktemp("triton-repo-flux")
    options = RepoOptions(name=MODEL, kind="cpu", copy_bundle=True, python_env=str(triton_venv()))
    write_repository(preset_bundle("tiny-flux")[1], repo, options)
    with TritonServer(repo, repo.parent / "tritonserver.log") as server:
        yield server


def test_flux_requests_over_grpc_equal_pipeline(flux_triton, preset_bundle):
    import tritonclient.grpc as grpcclient

    shared_before = _metric(flux_triton, "sdrt_unet_shared_calls")
    requests = [
        _inputs(grpcclient, p, num_inference_steps=n, guidance_scale=g, seed=s)
        for p, n, g, s in REQUESTS
    ]
    results = _stream(flux_triton, requests)
    pipe = Pipeline.load(preset_bundle("tiny-flux")[1], device="cpu")
    for i, (prompt, steps, guidance, seed) in enumerate(REQUESTS):
        image, error = results[str(i)]
        assert error is None, error
        alone = pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed, output_type="np"
        ).images[0]
        assert np.abs(image - alone * 255.0).max() <= 0.5 + 255 * 1e-5, f"request {i}"
    assert _metric(flux_triton, "sdrt_unet_shared_calls") > shared_before
