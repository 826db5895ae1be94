"""OpenAI Images API conformance of `sdrt serve` (a real process, real clients): every field of
OpenAI's published CreateImageRequest / CreateImageEditRequest (vendored in
openai_images_schema.json) is accepted in every listed value or refused by a documented
limit, answers validate against OpenAI's ImagesResponse and stream-event schemas, streamed
previews converge on the image, url images are served behind the key."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.benchmarks.serve_process import ServeProcess
from sdrt.serve.image_store import ImageStore, StoreFull

KEY = "openai-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SPEC = json.loads((Path(__file__).parent / "openai_images_schema.json").read_text())
FAST = {"num_inference_steps": 2}
NATIVE = "64x64"  # the tiny bundle's default size


def openai_schema(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}", **SPEC}


def assert_fits(body: dict, name: str) -> None:
    jsonschema.validate(body, openai_schema(name), cls=jsonschema.Draft202012Validator)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    options = ["--api-key", KEY, "--max-size", "256", "--max-images", "4", "--max-steps", "60"]
    process = ServeProcess([tiny_bundle], options).start()
    yield process
    assert process.stop() == 0


def post(server, path, **kwargs):
    return httpx.post(f"{server.url}{path}", headers=AUTH, timeout=120, **kwargs)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def metadata(image: Image.Image) -> dict:
    if image.format == "PNG":
        return dict(image.text)
    return json.loads(image.getexif()[0x010E])


# (field, value) pairs OpenAI's schema allows that a documented limit of this server refuses
REFUSED = {
    ("background", "transparent"): "draw no alpha channel",
    ("n", 10): "n must be an integer from 1 to 4",
    **{("size", s): "at most 256" for s in ("1024x1024", "1536x1024", "1024x1536", "1792x1024")},
    **{("size", s): "at most 256" for s in ("1024x1792", "512x512")},
}


def refusal(name: str, value) -> str | None:
    """The documented refusal a listed value meets here: OpenAI's own model names are not
    served, OpenAI's large sizes are over --max-size, n 10 is over --max-images."""
    if name == "model" and value not in ("tiny", None):
        return "is not served here"
    return REFUSED.get((name, value))


def listed_values(name: str, prop: dict) -> list:
    """Every value OpenAI's schema names for a field (enums, bounds, null), else a sample."""
    branches = prop.get("anyOf", [prop])
    values = [v for b in branches for v in b.get("enum", [])]
    for branch in branches:
        for bound in ("minimum", "maximum"):
            if bound in branch:
                values.append(branch[bound])
        if branch.get("type") == "boolean":
            values += [False, True]
    if prop.get("nullable") or any(b.get("type") == "null" for b in branches):
        values.append(None)
    samples = {"prompt": "a cat", "model": "tiny", "size": "64x64", "user": "u-1"}
    values += [samples[name]] if name in samples else []
    values += [0, 50] if name == "output_compression" else []
    return [v for v in dict.fromkeys(map(json.dumps, values)) for v in [json.loads(v)]]


def generation_cases() -> list:
    props = SPEC["components"]["schemas"]["CreateImageRequest"]["properties"]
    return [(name, value) for name, prop in props.items() for value in listed_values(name, prop)]


def read_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


@pytest.mark.parametrize(("name", "value"), generation_cases())
def test_every_openai_generation_field_value_is_accepted_or_refused_by_a_documented_limit(
    server, name, value
):
    refused = refusal(name, value)
    if name in ("model", "n", "size", "stream") or refused:
        fields = {"prompt": "a cat", "size": "32x32", **FAST, name: value}
    else:
        fields = {"prompt": "a cat", "size": "32x32", name: value}
        fields.update(FAST if name != "quality" else {})
    response = post(server, "/v1/images/generations", json=fields)
    if refused:
        assert response.status_code in (400, 404), response.text
        assert refused in response.json()["error"]["message"]
        return
    assert response.status_code == 200, response.text
    if fields.get("stream"):
        events = read_events(response)
        assert [e["type"] for e in events] == ["image_generation.completed"]
        assert_fits(events[0], "ImageGenStreamEvent")
        return
    body = response.json()
    assert_fits(body, "ImagesResponse")
    assert len(body["data"]) == (value if name == "n" and value else 1)
    if name == "quality" and value:
        expected = {"low": "low", "high": "high", "hd": "high"}.get(value, "medium")
        assert body["quality"] == expected
    if fields.get("response_format") == "url":
        image = Image.open(io.BytesIO(httpx.get(body["data"][0]["url"], headers=AUTH).content))
    else:
        image = decoded(body["data"][0]["b64_json"])
    assert image.format == {"jpeg": "JPEG", "webp": "WEBP"}.get(fields.get("output_format"), "PNG")
    assert body["output_format"] == (fields.get("output_format") or "png")
    size = fields["size"] if fields["size"] not in ("auto", None) else NATIVE
    assert metadata(image)["prompt"] == "a cat" and image.size == tuple(map(int, size.split("x")))


def test_quality_presets_set_the_step_count_and_explicit_steps_win(server):
    def steps(**fields):
        body = post(server, "/v1/images/generations", json={"prompt": "a", **fields}).json()
        return metadata(decoded(body["data"][0]["b64_json"]))["steps"], body.get("quality")

    assert steps(quality="low") == ("15", "low")
    assert steps(quality="standard") == ("30", "medium")
    assert steps(quality="hd") == ("45", "high")
    assert steps(quality="hd", num_inference_steps=3) == ("3", None)


def test_size_auto_is_the_bundle_size_and_listed_sizes_are_echoed(server):
    body = post(server, "/v1/images/generations", json={"prompt": "a", "size": "auto", **FAST})
    assert decoded(body.json()["data"][0]["b64_json"]).size == (64, 64)
    assert "size" not in body.json()  # 64x64 is not a size OpenAI's ImagesResponse lists


EDIT_VALUES = {
    "background": ["opaque", "auto"],
    "quality": ["low", "medium", "high", "auto", "standard"],
    "output_format": ["png", "jpeg", "webp"],
    "output_compression": ["0", "100"],
    "input_fidelity": ["high", "low"],
    "response_format": ["b64_json", "url"],
    "size": ["auto", "64x64"],
    "n": ["1", "2"],
    "user": ["u-1"],
    "model": ["tiny"],
    "stream": ["false"],
    "partial_images": ["0", "3"],
}


def picture_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_openai_edit_field_is_known_here():
    props = set(SPEC["components"]["schemas"]["CreateImageEditRequest"]["properties"])
    assert props - {"image", "mask", "prompt"} == set(EDIT_VALUES)


@pytest.mark.parametrize(
    ("name", "value"), [(n, v) for n, values in EDIT_VALUES.items() for v in values]
)
def test_every_openai_edit_field_value_is_accepted(server, name, value):
    files = {"image": ("a.png", picture_png(), "image/png")}
    data = {"prompt": "a dog", "num_inference_steps": "2", name: value}
    response = post(server, "/v1/images/edits", files=files, data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert_fits(body, "ImagesResponse")
    assert len(body["data"]) == (int(value) if name == "n" else 1)


def test_openai_client_streams_previews_then_the_same_image_as_without_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    call = {"prompt": "a fox", "size": "64x64", "model": "tiny"}
    sdrt = {"num_inference_steps": 12, "seed": 7, "scheduler": "ddim"}
    events = list(client.images.generate(**call, stream=True, partial_images=3, extra_body=sdrt))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    for event in events:
        assert_fits(event.model_dump(exclude_none=True), "ImageGenStreamEvent")
    pictures = [np.asarray(decoded(e.b64_json).convert("RGB"), np.float32) for e in events]
    plain = client.images.generate(**call, response_format="b64_json", extra_body=sdrt)
    assert np.array_equal(np.asarray(decoded(plain.data[0].b64_json).convert("RGB")), pictures[-1])
    assert not any(np.array_equal(p, pictures[-1]) for p in pictures[:3])


class Recording:
    """The U-Net engine, keeping each call's output (the test's view of the model)."""

    def __init__(self, engine):
        self.engine, self.outputs = engine, []

    def run(self, feeds):
        out = self.engine.run(feeds)
        self.outputs.append(out["noise_pred"])
        return out


def test_streamed_previews_are_diffusers_predicted_clean_image_at_evenly_spaced_steps(
    server, tiny_bundle
):
    from diffusers import DDIMScheduler

    from sdrt import Pipeline
    from sdrt.denoise import start_request, step

    fields = {"prompt": "a fox", "size": "64x64", "stream": True, "partial_images": 3}
    sdrt = {"num_inference_steps": 12, "seed": 7, "scheduler": "ddim", "guidance_scale": 7.5}
    with httpx.stream(
        "POST", f"{server.url}/v1/images/generations", headers=AUTH, json=fields | sdrt
    ) as response:
        events = read_events(response)
    previews = [np.asarray(decoded(e["b64_json"]).convert("RGB"), np.int16) for e in events[:3]]
    # the same request stepped here, its x0 taken from diffusers' own DDIM step
    pipe = Pipeline.load(tiny_bundle, device="cpu")
    args = pipe.arguments(prompt="a fox", height=64, width=64, **sdrt)
    state = start_request(pipe, args, pipe.conditionings([args])[0], True)
    unet = Recording(pipe.engines["unet"])
    reference = DDIMScheduler.from_config(pipe.manifest["scheduler_config"])
    reference.set_timesteps(12)
    expected = []
    for index, t in enumerate(state.timesteps):
        before = state.latents
        step(unet, [state])
        uncond, text = np.split(unet.outputs[-1], 2)
        noise = uncond + np.float32(7.5) * (text - uncond)
        if index + 1 in (3, 6, 9):  # 12 steps, 3 previews: after steps 3, 6 and 9
            x0 = reference.step(
                torch.from_numpy(noise), int(t), torch.from_numpy(before)
            ).pred_original_sample.numpy()
            expected.append((pipe.decode_latents(x0)[0] * 255).round().astype(np.int16))
    for ours, theirs in zip(previews, expected, strict=True):
        assert np.abs(ours - theirs).max() <= 1  # PNG rounding


def test_openai_client_streams_edits(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    stream = client.images.edit(
        image=("a.png", picture_png(), "image/png"),
        prompt="a dog",
        stream=True,
        partial_images=1,
        output_format="webp",
        extra_body={"num_inference_steps": 4},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    for event in events:
        assert_fits(event.model_dump(exclude_none=True), "ImageEditStreamEvent")
        assert decoded(event.b64_json).format == "WEBP"


def test_url_images_are_served_behind_the_key(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    sdrt = {"num_inference_steps": 2, "seed": 3}
    made = client.images.generate(prompt="a", size="64x64", response_format="url", extra_body=sdrt)
    url = made.data[0].url
    assert url.startswith(f"{server.url}/v1/images/files/") and made.data[0].b64_json is None
    fetched = httpx.get(url, headers=AUTH)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    inline = client.images.generate(prompt="a", size="64x64", extra_body=sdrt)
    assert fetched.content == base64.b64decode(inline.data[0].b64_json)
    assert httpx.get(url).status_code == 401
    missing = httpx.get(f"{server.url}/v1/images/files/nothing.png", headers=AUTH)
    assert missing.status_code == 404 and "expired" in missing.json()["error"]["message"]


def test_image_store_expires_and_evicts_the_oldest_within_its_budget():
    now = [0.0]
    store = ImageStore(ttl_s=60, max_bytes=10, clock=lambda: now[0])
    first = store.put(b"aaaa", "image/png", "png")
    second = store.put(b"bbbb", "image/png", "png")
    third = store.put(b"cccc", "image/png", "png")  # 12 bytes > 10: the oldest goes
    assert store.get(first) is None and store.get(second).data == b"bbbb"
    now[0] = 61.0
    assert store.get(second) is None and store.get(third) is None
    with pytest.raises(StoreFull, match="--image-store-mb"):
        store.put(b"x" * 11, "image/png", "png")


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_client_that_leaves_mid_stream_frees_its_rows(server):
    images_before = metric(server, "sdrt_images_generated_total")
    body = json.dumps(
        {"prompt": "slow", "num_inference_steps": 60, "size": "256x256", "n": 4, "stream": True}
        | {"partial_images": 3, "scheduler": "ddim"}
    )
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(
            f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            f"{body}".encode()
        )
        raw.settimeout(60)
        received = b""
        while b"partial_image" not in received:  # bounded by the socket timeout
            received += raw.recv(65536)
    for _ in range(100):  # bounded: the server notices within a tick
        if metric(server, "sdrt_active_requests") == 0:
            break
        time.sleep(0.1)
    assert metric(server, "sdrt_active_requests") == 0
    assert metric(server, "sdrt_images_generated_total") == images_before


@pytest.mark.parametrize(
    ("fields", "fragment", "param"),
    [
        ({"background": "transparent"}, "draw no alpha channel; use opaque or auto", "background"),
        ({"partial_images": 4, "stream": True}, "from 0 to 3", "partial_images"),
        ({"output_compression": 101}, "from 0 to 100", "output_compression"),
        ({"quality": "ultra"}, "quality must be one of low, medium", "quality"),
        ({"output_format": "gif"}, "output_format must be one of png, jpeg, webp", None),
        ({"stream": "yes"}, "stream must be true or false", "stream"),
        ({"style": "oil"}, "style must be one of vivid, natural", "style"),
        ({"user": 5}, "user must be a string", "user"),
    ],
)
def test_bad_openai_field_gets_one_sentence(server, fields, fragment, param):
    response = post(server, "/v1/images/generations", json={"prompt": "a", **FAST, **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert fragment in error["message"] and "\n" not in error["message"]
    assert error["param"] == (param or next(iter(fields)))


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--image-store-mb", "-1"], "--image-store-mb >= 0, got 60.0 and -1.0"),
        (["--image-url-ttl", "0"], "--image-url-ttl must be > 0"),
        (["--max-partial-images", "4"], "--max-partial-images must be 0 to 3, got 4"),
        (["--max-loras", "0"], "--max-loras must be in 1-1024, got 0"),
    ],
)
def test_bad_new_serve_flag_is_one_line_and_exit_2(capsys, flags, line):
    from sdrt.cli import main

    assert main(["serve", "no-such-bundle", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], lines
