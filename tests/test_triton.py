"""`sdrt triton-repo` against a real Triton Inference Server on 127.0.0.1 (CPU).

The server is the `tritonserver` binary from nvidia-pytriton (`scripts/install.sh --test`,
which scripts/test.sh runs, builds .venv-triton); a missing binary fails these tests rather
than skipping them. The model is decoupled, which Triton serves through gRPC streaming only
(HTTP /infer refuses decoupled models); HTTP is checked for health, metadata and config.
"""

from __future__ import annotations

import queue
import re
import urllib.request

import numpy as np
import pytest

from sdrt import Pipeline
from sdrt.benchmarks.serve_layers import kserve_inputs
from sdrt.cli import main
from sdrt.serve.triton_model import check_provenance, request_arguments
from sdrt.serve.triton_repo import RepoOptions, write_repository

MODEL = "sdrt"
# (prompt, steps, scheduler, guidance, seed): mixed so requests share U-Net calls mid-flight
MIXED = [
    ("a red bicycle", 2, "euler", 7.5, 1),
    ("a blue house", 4, "dpmpp_2m", 1.0, 2),
    ("a cat", 3, "ddim", 3.0, 3),
    ("a dog on grass", 5, "euler_a", 7.5, 4),
    ("a red bicycle", 4, "euler", 5.0, 5),
    ("mountains", 2, "pndm", 1.0, 6),
    ("a boat", 3, "dpmpp_2m", 9.0, 7),
    ("a lamp", 5, "unipc", 2.0, 8),
]


@pytest.fixture(scope="module")
def triton(tiny_bundle, tmp_path_factory):
    from sdrt.benchmarks.tritonserver import TritonServer, triton_venv

    repo = tmp_path_factory.mktemp("triton-repo")
    write_repository(
        tiny_bundle,
        repo,
        # the default kind, KIND_AUTO: Triton must place it on the CPU of this GPU-less host
        RepoOptions(name=MODEL, copy_bundle=True, max_queue=16, python_env=str(triton_venv())),
    )
    with TritonServer(repo, repo.parent / "tritonserver.log") as server:
        yield server


def _inputs(grpcclient, prompt=None, **values):
    return kserve_inputs(grpcclient, values if prompt is None else {"prompt": prompt, **values})


def _stream(server, requests: list[list]) -> dict[str, tuple]:
    """Send every request on one gRPC stream at once; request id -> (image or None, error)."""
    import tritonclient.grpc as grpcclient

    done: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: done.put((result, error)))
        for i, inputs in enumerate(requests):
            client.async_stream_infer(MODEL, inputs, request_id=str(i))
        results = {}
        for _ in requests:
            result, error = done.get(timeout=120)
            if error is not None:
                results[_error_request_id(error, results, len(requests))] = (None, error)
            else:
                results[result.get_response().id] = (result.as_numpy("image"), None)
        client.stop_stream()
    return results


def _error_request_id(error, results, count) -> str:
    """Stream errors carry no request id in tritonclient; the tests send one bad one at a time."""
    assert count == 1, f"unexpected error in a multi-request stream: {error}"
    return "0"


def test_loras_input_is_a_json_object_of_scales(tiny_bundle, tmp_path):
    tensors = {"prompt": np.array([b"a"], object), "loras": np.array([b'{"style": 0.5}'], object)}
    assert request_arguments(tensors.get)["loras"] == {"style": 0.5}
    for bad, message in ((b"{oops", "input loras is not JSON"), (b"[1]", "must be a JSON object")):
        with pytest.raises(ValueError, match=message):
            request_arguments({**tensors, "loras": np.array([bad], object)}.get)
    options = RepoOptions(name="lora", lora_dir=str(tmp_path))
    config = (
        write_repository(tiny_bundle, tmp_path / "repo", options) / "config.pbtxt"
    ).read_text()
    assert 'name: "loras" data_type: TYPE_STRING dims: [ 1 ] optional: true' in config
    assert f'key: "lora_dir" value: {{ string_value: "{tmp_path.resolve()}" }}' in config


def test_repository_records_provenance_and_triton_settings(tiny_bundle, tmp_path):
    model = write_repository(tiny_bundle, tmp_path, RepoOptions(name="sd", instances=2, kind="gpu"))
    config = (model / "config.pbtxt").read_text()
    assert "model_transaction_policy { decoupled: true }" in config
    assert "instance_group [ { count: 2 kind: KIND_GPU } ]" in config
    manifest = Pipeline.load(tiny_bundle).manifest
    for info in manifest["components"].values():
        assert info["sha256"] in config
    assert f'string_value: "{tiny_bundle.resolve()}"' in config
    assert (model / "1" / "model.py").read_text().count("import") == 1
    for name in ("prompt", "negative_prompt", "scheduler"):
        assert re.search(rf'name: "{name}" data_type: TYPE_STRING', config)
    assert 'name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ]' in config


def test_triton_repo_command_refuses_bad_options_and_existing_model(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_bundle), str(out)]) == 0
    assert "kind: KIND_AUTO" in (out / "sdrt" / "config.pbtxt").read_text()
    assert main(["triton-repo", str(tiny_bundle), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["triton-repo", str(tiny_bundle), str(out), "--name", "x", "--instances", "0"]) == 2
    assert (
        main(["triton-repo", str(tiny_bundle), str(out), "--name", "y", "--backend", "tensorrt"])
        == 2
    )
    assert "no TensorRT engines" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sdrt"]  # nothing half-written


def test_request_arguments_keep_defaults_for_absent_inputs():
    tensors = {"prompt": np.array([b"a cat"], object), "seed": np.array([3], np.int64)}
    assert request_arguments(tensors.get) == {"prompt": "a cat", "seed": 3}
    with pytest.raises(ValueError, match="prompt is missing"):
        request_arguments({}.get)
    with pytest.raises(ValueError, match="one element"):
        request_arguments({"prompt": np.array([b"a", b"b"], object)}.get)


def test_health_ready_and_model_config_over_http(triton):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton.http_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    config = client.get_model_config(MODEL)
    assert config["model_transaction_policy"]["decoupled"] is True
    assert [group["kind"] for group in config["instance_group"]] == ["KIND_CPU"]  # from AUTO
    names = {i["name"]: i["datatype"] for i in client.get_model_metadata(MODEL)["inputs"]}
    assert names["seed"] == "INT64" and names["prompt"] == "BYTES"


def test_concurrent_mixed_requests_over_grpc_equal_pipeline(triton, tiny_bundle):
    import tritonclient.grpc as grpcclient

    shared_before = _metric(triton, "sdrt_unet_shared_calls")
    requests = [
        _inputs(
            grpcclient,
            prompt,
            num_inference_steps=steps,
            scheduler=scheduler,
            guidance_scale=guidance,
            seed=seed,
        )
        for prompt, steps, scheduler, guidance, seed in MIXED
    ]
    results = _stream(triton, requests)
    pipe = Pipeline.load(tiny_bundle, device="cpu")
    for i, (prompt, steps, scheduler, guidance, seed) in enumerate(MIXED):
        image, error = results[str(i)]
        assert error is None, error
        alone = pipe(
            prompt,
            num_inference_steps=steps,
            scheduler=scheduler,
            guidance_scale=guidance,
            seed=seed,
            output_type="np",
        ).images[0]
        assert image.dtype == np.uint8 and image.shape == (*alone.shape[:2], 3)
        # uint8 rounding of an image within 1e-5 of Pipeline's (float [0, 1])
        assert np.abs(image - alone * 255.0).max() <= 0.5 + 255 * 1e-5, f"request {i}"
    # decoupled: requests met inside the batcher and shared U-Net calls
    assert _metric(triton, "sdrt_unet_shared_calls") > shared_before


@pytest.mark.parametrize(
    "values, message",
    [
        ({"num_inference_steps": 2}, "prompt is missing"),
        ({"prompt": "x", "scheduler": "nope"}, "unknown scheduler 'nope'"),
        ({"prompt": "x", "height": 65}, "height must be a positive multiple of"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps must be an integer"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale must be a finite"),
        ({"prompt": ["a", "b"]}, "unexpected shape for input 'prompt'"),  # Triton's check
    ],
)
def test_bad_input_gets_a_triton_error_and_the_model_keeps_serving(triton, values, message):
    import tritonclient.grpc as grpcclient

    results = _stream(triton, [_inputs(grpcclient, **values)])
    image, error = results["0"]
    assert image is None and message in str(error)
    good = _stream(triton, [_inputs(grpcclient, "x", num_inference_steps=1, seed=0)])
    assert good["0"][1] is None and good["0"][0].dtype == np.uint8


def test_metrics_count_the_requests(triton):
    import tritonclient.grpc as grpcclient

    before = _metric(triton, "nv_inference_request_success")
    _stream(triton, [_inputs(grpcclient, f"m{i}", num_inference_steps=1) for i in range(3)])
    assert _metric(triton, "nv_inference_request_success") >= before + 3


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf'^{name}\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)$', text, re.M)
    assert match, f"{name} for {MODEL} not in /metrics"
    return float(match.group(1))


def test_a_changed_bundle_is_refused(tmp_path):
    check_provenance({"unet": "a"}, {"unet": "a"}, tmp_path)
    with pytest.raises(ValueError, match=r"changed since `sdrt triton-repo` .* \(unet\)"):
        check_provenance(
            {"unet": "a", "vae_decoder": "b"}, {"unet": "c", "vae_decoder": "b"}, tmp_path
        )
