"""sdrt.serve.ray on a local Ray (2 CPUs) with 2 replicas of 1 CPU each, through Ray's HTTP
proxy on 127.0.0.1 with real clients (httpx, openai). Ray starts once for the module."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve

from sdrt import Pipeline
from sdrt.benchmarks.serve_process import free_port
from sdrt.serve.ray import REPLICA_HEADER, ReplicaConfig, build, deployment_options

APP = "sdrt"
READY_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def ray_url(tiny_bundle):
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = deployment_options(replicas=2, cpus_per_replica=1)
        serve.run(build(ReplicaConfig(bundles=(str(tiny_bundle),)), options), name=APP)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    return Pipeline.load(tiny_bundle, device="cpu")


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"Ray Serve app not ready after {READY_TIMEOUT_S} s: {serve.status()}")


def _generate(url: str, **fields) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/images/generations",
        json={"prompt": "a fox", "size": "64x64", **fields},
        timeout=120,
    )


def _generate_retrying(url: str, attempts: int, **fields) -> tuple[httpx.Response, int]:
    """The response and how many failed tries came before it: a client of a replicated
    service retries 5xx and dropped connections (bounded); a seeded request is idempotent."""
    for failures in range(attempts):
        try:
            response = _generate(url, **fields)
            if response.status_code < 500 or failures == attempts - 1:
                return response, failures
        except httpx.TransportError:
            if failures == attempts - 1:
                raise
        time.sleep(0.5)
    raise AssertionError("unreachable")


def _pixels(response: httpx.Response) -> np.ndarray:
    b64 = response.json()["data"][0]["b64_json"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), np.float32)


def _alone(runtime, **call) -> np.ndarray:
    return runtime("a fox", **call, output_type="np").images[0] * 255.0


MIXED = [
    {"seed": i, "num_inference_steps": 2 + i % 3, "scheduler": s, "guidance_scale": g}
    for i, (s, g) in enumerate(
        [("euler", 7.5), ("ddim", 1.0), ("dpmpp_2m", 3.0), ("euler_a", 7.5)] * 2
    )
]


def test_requests_reach_both_replicas_and_equal_pipeline(ray_url, runtime):
    with ThreadPoolExecutor(len(MIXED)) as pool:
        responses = list(pool.map(lambda f: _generate(ray_url, **f), MIXED))
    for fields, response in zip(MIXED, responses, strict=True):
        assert response.status_code == 200, response.text
        # PNG rounding of an image within 1e-5 of Pipeline's
        assert np.abs(_pixels(response) - _alone(runtime, **fields)).max() <= 0.5 + 255e-5
    assert len({r.headers[REPLICA_HEADER] for r in responses}) == 2


def test_openai_client_works_through_the_ray_ingress(ray_url, runtime):
    from openai import OpenAI

    client = OpenAI(base_url=f"{ray_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    made = client.images.generate(
        model="tiny",
        prompt="a fox",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 3},
    )
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json))), np.float32)
    expected = _alone(runtime, seed=11, num_inference_steps=3)
    assert np.abs(image - expected).max() <= 0.5 + 255e-5


def _replicas() -> list[str]:
    """The live replicas' actor names (Ray names each replica actor by its replica id)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in named if a["namespace"] == "serve" and f"::{APP}#" in a["name"]]


def _holding_requests(replicas: list[str], timeout_s: float) -> str:
    """The first replica that holds a request, by the count Serve's router probes
    (`ReplicaActor.get_num_ongoing_requests`, ray 2.60 serve/_private/replica.py: requests
    the replica accepted and has not answered; served on its own thread, so a busy replica
    still answers)."""
    actors = {name: ray.get_actor(name, namespace="serve") for name in replicas}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = ray.get([a.get_num_ongoing_requests.remote() for a in actors.values()])
        for name, count in zip(actors, counts, strict=True):
            if count > 0:
                return name
        time.sleep(0.05)
    raise TimeoutError(f"no replica of {replicas} took a request in {timeout_s} s")


def test_killed_replica_loses_no_request_and_serve_brings_it_back(ray_url, runtime):
    replicas = _replicas()
    assert len(replicas) == 2, replicas
    load = [{"seed": 100 + i, "num_inference_steps": 30} for i in range(8)]
    with ThreadPoolExecutor(len(load)) as pool:
        futures = [pool.submit(_generate_retrying, ray_url, 5, **fields) for fields in load]
        victim = _holding_requests(replicas, timeout_s=60)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result() for f in futures]
    assert sum(failures for _, failures in results) > 0  # the victim had requests in flight
    for fields, (response, _) in zip(load, results, strict=True):
        assert response.status_code == 200, response.text
        assert np.abs(_pixels(response) - _alone(runtime, **fields)).max() <= 0.5 + 255e-5
    deadline, seen = time.monotonic() + READY_TIMEOUT_S, set()
    while time.monotonic() < deadline and len(seen - {victim}) < 2:
        response, _ = _generate_retrying(ray_url, 5, seed=1, num_inference_steps=1)
        seen.add(response.headers[REPLICA_HEADER])
    assert len(seen - {victim}) == 2, f"Serve did not replace {victim}: {serve.status()}"


def test_deployment_options_one_gpu_per_replica_and_autoscaling(tmp_path, capsys):
    from sdrt.cli import main

    gpu = deployment_options(replicas=3, gpu=True)
    assert gpu["num_replicas"] == 3 and gpu["ray_actor_options"]["num_gpus"] == 1
    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    assert deployment_options(autoscaling=scaling)["autoscaling_config"] == scaling
    assert "num_gpus" not in deployment_options(replicas=1)["ray_actor_options"]
    with pytest.raises(ValueError, match="unknown autoscaling setting max"):
        deployment_options(autoscaling={"max": 2})
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        deployment_options(autoscaling={"min_replicas": 3, "max_replicas": 2})
    config = tmp_path / "scaling.json"
    config.write_text('{"max_replicas": 2}')
    assert (
        main(["serve", "b", "--ray", "--replicas", "2", "--autoscaling-config", str(config)]) == 2
    )
    assert "not both" in capsys.readouterr().err


def test_serve_run_builder_reads_its_arguments(ray_url, tiny_bundle):
    from ray.serve import Application

    from sdrt.serve.ray import app

    assert isinstance(app({"bundle": str(tiny_bundle), "replicas": "2"}), Application)
    assert isinstance(app({"bundle": str(tiny_bundle), "max_replicas": "3"}), Application)
    with pytest.raises(ValueError, match="unknown argument replica"):
        app({"bundle": str(tiny_bundle), "replica": "2"})
    with pytest.raises(ValueError, match="give bundle="):
        app({})
