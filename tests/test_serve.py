"""`sdrt serve` as a real process on 127.0.0.1 with real clients (openai, httpx): OpenAI
Images API, batched images equal to Pipeline alone, backpressure, disconnects, draining on
SIGTERM, and one-sentence errors for bad input."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from sdrt import Pipeline
from sdrt.benchmarks.serve_process import ServeProcess

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_bundle):
    process = ServeProcess(
        [tiny_bundle],
        [
            "--api-key",
            KEY,
            "--max-size",
            "256",
            "--max-images",
            "4",
            "--max-steps",
            "1000",
            "--max-body-mb",
            "0.5",
            "--max-image-pixels",
            "1000000",
        ],
    ).start()
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    return Pipeline.load(tiny_bundle, device="cpu")


def post(server, path, timeout=120.0, headers=None, **kwargs):
    headers = {**AUTH, **(headers or {})}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=timeout, **kwargs)


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.int16)


def alone(runtime, **call) -> np.ndarray:
    """Pipeline's image for the same arguments, quantized as the PNG is."""
    out = runtime(**call, output_type="np").images[0]
    return (out * 255).round().astype(np.int16)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def test_openai_client_generates_and_edits(server, runtime):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == ["tiny"]
    sdrt_fields = {"num_inference_steps": 3, "seed": 5, "scheduler": "ddim"}
    made = client.images.generate(
        model="tiny",
        prompt="a cat",
        size="64x64",
        response_format="b64_json",
        extra_body=sdrt_fields,
    )
    image = png(made.data[0].b64_json)
    assert image.text["prompt"] == "a cat" and image.text["seed"] == "5"
    assert image.text["generator"] == "sdrt" and image.text["scheduler"] == "ddim"
    expected = alone(runtime, prompt="a cat", num_inference_steps=3, seed=5, scheduler="ddim")
    assert np.abs(pixels(image) - expected).max() <= 1  # PNG rounding of a 1e-5 difference

    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    files = {}
    for name, picture in (("image", start), ("mask", mask)):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        files[name] = (f"{name}.png", buffer.getvalue(), "image/png")
    edited = client.images.edit(
        model="tiny",
        image=files["image"],
        mask=files["mask"],
        prompt="a dog",
        n=2,
        response_format="b64_json",
        extra_body={**sdrt_fields, "strength": 0.5},
    )
    assert len(edited.data) == 2
    result = png(edited.data[0].b64_json)
    assert result.text["strength"] == "0.5" and result.text["mask"] == "mask.png"
    reference = runtime(
        ["a dog"] * 2,
        image=start,
        mask_image=mask,
        strength=0.5,
        num_inference_steps=3,
        seed=5,
        scheduler="ddim",
        output_type="np",
    ).images
    for data, ours in zip(edited.data, reference, strict=True):
        assert np.abs(pixels(png(data.b64_json)) - (ours * 255).round()).max() <= 1


MIXED = [
    {
        "num_inference_steps": 3 + i % 5,
        "scheduler": ("ddim", "euler", "euler_a", "dpmpp_2m")[i % 4],
        "guidance_scale": (1.0, 7.5, 3.0)[i % 3],
        "size": ("64x64", "48x32")[i % 2],
        "seed": 100 + i,
    }
    for i in range(16)
]


def test_concurrent_mixed_requests_each_equal_pipeline_alone_and_share_unet_calls(server, runtime):
    before = metric(server, 'sdrt_unet_requests_per_call_bucket{le="1"')
    calls_before = metric(server, "sdrt_unet_call_seconds_count")
    barrier = threading.Barrier(len(MIXED))

    def request(fields):
        barrier.wait()
        return post(server, "/v1/images/generations", json={"prompt": "a fox", **fields})

    with ThreadPoolExecutor(len(MIXED)) as pool:
        responses = list(pool.map(request, MIXED))
    for fields, response in zip(MIXED, responses, strict=True):
        assert response.status_code == 200, response.text
        width, height = map(int, fields["size"].split("x"))
        call = {k: v for k, v in fields.items() if k != "size"}
        expected = alone(runtime, prompt="a fox", height=height, width=width, **call)
        image = png(response.json()["data"][0]["b64_json"])
        assert np.abs(pixels(image) - expected).max() <= 1
    single = metric(server, 'sdrt_unet_requests_per_call_bucket{le="1"') - before
    calls = metric(server, "sdrt_unet_call_seconds_count") - calls_before
    assert calls > single  # some U-Net calls carried more than one request


def test_full_queue_answers_429_with_retry_after_and_loses_nothing(tiny_bundle, runtime):
    server = ServeProcess([tiny_bundle], ["--max-queue", "2", "--max-batch-rows", "2"]).start()
    try:
        barrier = threading.Barrier(12)

        def request(seed):
            barrier.wait()
            return httpx.post(
                f"{server.url}/v1/images/generations",
                timeout=120,
                json={
                    "prompt": "a yak",
                    "num_inference_steps": 40,
                    "seed": seed,
                    "scheduler": "ddim",
                    "size": "128x128",
                },
            )

        with ThreadPoolExecutor(12) as pool:
            responses = dict(zip(range(12), pool.map(request, range(12)), strict=True))
        refused = [r for r in responses.values() if r.status_code == 429]
        accepted = {s: r for s, r in responses.items() if r.status_code == 200}
        assert refused and len(refused) + len(accepted) == 12
        assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
        for seed, response in accepted.items():
            image = png(response.json()["data"][0]["b64_json"])
            assert image.text["seed"] == str(seed)
            expected = alone(
                runtime,
                prompt="a yak",
                num_inference_steps=40,
                seed=seed,
                scheduler="ddim",
                height=128,
                width=128,
            )
            assert np.abs(pixels(image) - expected).max() <= 1
        warmup = 1
        assert metric(server, "sdrt_images_generated_total") == len(accepted) + warmup
    finally:
        assert server.stop() == 0


def test_client_that_disconnects_frees_its_rows(server):
    images_before = metric(server, "sdrt_images_generated_total")
    body = json.dumps(
        {
            "prompt": "slow",
            "num_inference_steps": 999,
            "size": "256x256",
            "n": 4,
            "scheduler": "ddim",
        }
    )
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(
            f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            f"{body}".encode()
        )
        for _ in range(200):  # bounded: until the batcher is running it
            if metric(server, "sdrt_active_requests") == 1:
                break
            time.sleep(0.05)
        assert metric(server, "sdrt_active_requests") == 1
    for _ in range(100):  # bounded: the server notices within a poll and a tick
        if metric(server, "sdrt_active_requests") == 0:
            break
        time.sleep(0.1)
    assert metric(server, 'sdrt_requests_total{model="tiny",status="499"') == 1
    assert metric(server, "sdrt_active_requests") == 0
    assert metric(server, "sdrt_images_generated_total") == images_before


def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_0(tiny_bundle):
    server = ServeProcess([tiny_bundle]).start()
    body = {"prompt": "a owl", "num_inference_steps": 80, "size": "128x128"}
    with ThreadPoolExecutor(3) as pool:
        running = [
            pool.submit(httpx.post, f"{server.url}/v1/images/generations", json=body, timeout=120)
            for _ in range(3)
        ]
        for _ in range(200):  # bounded: until the batcher has them
            if metric(server, "sdrt_active_requests") == 3:
                break
            time.sleep(0.05)
        server.process.terminate()
        late = None
        for _ in range(50):
            late = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=10)
            if late.status_code == 503:
                break
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        assert [r.result().status_code for r in running] == [200, 200, 200]
    assert server.process.wait(60) == 0


def bomb_png() -> bytes:
    """A 3000x3000 PNG of a few kilobytes: 9 million pixels, over the server's 1 million."""
    buffer = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buffer, format="PNG")
    return buffer.getvalue()


def picture_png(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = {"prompt": "a cat", "num_inference_steps": 2}
JSON_CASES = [
    ({"prompt": 5}, 400, "prompt must be a string", "prompt"),
    ({"num_inference_steps": 2}, 400, "prompt is required", "prompt"),
    ({**GOOD, "negative_prompt": 3}, 400, "negative_prompt must be a string", "negative_prompt"),
    ({**GOOD, "scheduler": "warp"}, 400, "unknown scheduler 'warp'", "scheduler"),
    ({**GOOD, "size": "60x64"}, 400, "width must be a positive multiple of 16", "size"),
    ({**GOOD, "size": "64x512"}, 400, "height must be at most 256", "size"),
    ({**GOOD, "size": "big"}, 400, "size must be WIDTHxHEIGHT", "size"),
    (
        {**GOOD, "num_inference_steps": 0},
        400,
        "num_inference_steps must be an integer >= 1",
        "num_inference_steps",
    ),
    ({**GOOD, "num_inference_steps": 1001}, 400, "at most 1000", "num_inference_steps"),
    (
        {**GOOD, "num_inference_steps": "ten"},
        400,
        "num_inference_steps must be an integer",
        "num_inference_steps",
    ),
    ({**GOOD, "n": 0}, 400, "n must be an integer from 1 to 4", "n"),
    ({**GOOD, "n": 500}, 400, "n must be an integer from 1 to 4", "n"),
    (
        {**GOOD, "guidance_scale": "high"},
        400,
        "guidance_scale must be a finite number",
        "guidance_scale",
    ),
    ({**GOOD, "seed": -1}, 400, "seed must be >= 0", "seed"),
    ({**GOOD, "seed": 1.5}, 400, "seed must be an integer", "seed"),
    ({**GOOD, "response_format": "png"}, 400, "must be one of b64_json, url", "response_format"),
    ({**GOOD, "colour": "red"}, 400, "unknown field 'colour'", "colour"),
    ({**GOOD, "model": "sdxl"}, 404, "model 'sdxl' is not served here", "model"),
]
RAW_CASES = [
    (b'{"prompt": "a cat", "guidance_scale": NaN}', 400, "guidance_scale must be a finite number"),
    (b'{"prompt": "a cat",', 400, "the body is not valid JSON"),
    (b'["a cat"]', 400, "the body must be a JSON object"),
    (b'{"prompt": "' + b"x" * 600_000 + b'"}', 413, "the request body is over"),
]
EDIT_CASES = [
    ({"image": ("a.txt", b"not a picture", "text/plain")}, {}, 400, "image is not an image file"),
    (
        {
            "image": ("a.png", picture_png(), "image/png"),
            "mask": ("m.png", picture_png((32, 32)), "image/png"),
        },
        {},
        400,
        "pass a mask of the image's size",
    ),
    ({"image": ("bomb.png", bomb_png(), "image/png")}, {}, 413, "over the limit of 1000000"),
    ({}, {}, 400, "image is required"),
    (
        {"image": ("a.png", picture_png(), "image/png")},
        {"strength": "2"},
        400,
        "strength must be in (0, 1]",
    ),
    (
        {"image": ("a.png", picture_png(), "image/png")},
        {"num_inference_steps": "abc"},
        400,
        "num_inference_steps must be an integer",
    ),
]


def assert_one_sentence(response, status, fragment, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert "\n" not in error["message"] and not re.search(r"\.\s+[A-Z]", error["message"])
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(("fields", "status", "fragment", "param"), JSON_CASES)
def test_bad_json_field_gets_its_status_and_one_sentence(server, fields, status, fragment, param):
    assert_one_sentence(
        post(server, "/v1/images/generations", json=fields), status, fragment, param
    )


@pytest.mark.parametrize(("body", "status", "fragment"), RAW_CASES)
def test_bad_body_gets_its_status_and_one_sentence(server, body, status, fragment):
    response = post(
        server,
        "/v1/images/generations",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert_one_sentence(response, status, fragment)


@pytest.mark.parametrize(("files", "fields", "status", "fragment"), EDIT_CASES)
def test_bad_upload_gets_its_status_and_one_sentence(server, files, fields, status, fragment):
    response = post(
        server,
        "/v1/images/edits",
        files=files,
        data={"prompt": "a cat", "num_inference_steps": "2", **fields},
    )
    assert_one_sentence(response, status, fragment)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(server, headers):
    response = httpx.post(f"{server.url}/v1/images/generations", json=GOOD, headers=headers)
    assert_one_sentence(response, 401, "missing or wrong API key")
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def test_server_keeps_serving_after_bad_input(server):
    for fields, *_ in JSON_CASES[:5]:
        post(server, "/v1/images/generations", json=fields)
    response = post(server, "/v1/images/generations", json=GOOD)
    assert response.status_code == 200 and len(response.json()["data"]) == 1
    ready = json.loads(httpx.get(f"{server.url}/ready").text)
    assert ready["status"] == "ready"
    for load_ms in ready["load_ms"].values():
        assert {"bundle", "verify", "unet", "vae_decoder", "total"} <= set(load_ms)
        assert all(ms > 0 for ms in load_ms.values())
    for components in ready["graph_cache"].values():  # the suite's cache: stored, then hit
        assert {"text_encoder", "unet", "vae_decoder"} <= set(components)
        assert all(set(c.values()) <= {"stored", "hit"} and c for c in components.values())
