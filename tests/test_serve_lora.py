"""Run-time LoRA through `sdrt serve --lora-dir` as a real process on 127.0.0.1, for a U-Net
and a Flux bundle: adapters preloaded by file stem, listed, loaded (API key, paths inside
--lora-dir only) and deleted, requests naming them get Pipeline's image, unknown names a 400,
and the metrics count them."""

from __future__ import annotations

import io
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from test_lora_runtime import peft_file
from test_serve import AUTH, KEY, alone, metric, pixels, png, post

from sdrt import Pipeline
from sdrt.benchmarks.serve_process import ServeProcess
from sdrt.export.bundle_writer import export_bundle
from sdrt.export.load import random_pipeline
from sdrt.export.presets import PRESETS

PROMPT = "a lighthouse"
CALL = {"prompt": PROMPT, "num_inference_steps": 2, "seed": 3, "size": "64x64"}
PRELOADED = ["attn", "detail"]


@pytest.fixture(scope="module", params=["tiny", "tiny-flux"])
def folders(request, tmp_path_factory):
    preset = request.param
    family = PRESETS[preset]["family"]
    denoiser = "unet" if family == "sd1" else "transformer"  # the peft targets' module
    std = 0.2 if family == "sd1" else 0.5  # tiny Flux's image moves by 2/255 at 0.2

    def adapter(folder, name, seed, targets):
        peft_file(folder, name, seed, {denoiser: targets}, preset, std)

    root = tmp_path_factory.mktemp("serve_lora")
    export_bundle(
        random_pipeline(preset, seed=0), root / "bundle", family, lora_rank=8, progress=False
    )
    loras = root / "loras"
    loras.mkdir()
    adapter(loras, "attn", 1, ["to_q", "to_k", "to_v", "to_out.0"])
    adapter(loras, "detail", 3, ["to_v", "ff.net.0.proj"])
    spare = root / "spare"
    spare.mkdir()
    adapter(spare, "ff", 2, ["to_k", "ff.net.0.proj", "ff.net.2"])
    return {"bundle": root / "bundle", "loras": loras, "spare": spare}


@pytest.fixture(scope="module")
def server(folders):
    process = ServeProcess(
        [folders["bundle"]], ["--api-key", KEY, "--lora-dir", str(folders["loras"])]
    ).start()
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def runtime(folders):
    pipe = Pipeline.load(folders["bundle"], device="cpu")
    pipe.adapters.load_folder(folders["loras"])
    return pipe


def names(server) -> list[str]:
    data = httpx.get(f"{server.url}/v1/loras", headers=AUTH).json()["data"]
    return sorted(entry["id"] for entry in data)


def test_lora_dir_is_preloaded_by_stem(server):
    assert names(server) == PRELOADED
    assert metric(server, "sdrt_lora_loaded") == 2


def test_request_with_adapter_is_pipelines_image(server, runtime):
    reply = post(server, "/v1/images/generations", json={**CALL, "loras": {"attn": 0.8}})
    assert reply.status_code == 200, reply.text
    got = pixels(png(reply.json()["data"][0]["b64_json"]))
    call = {"num_inference_steps": 2, "seed": 3, "height": 64, "width": 64}
    want = alone(runtime, prompt=PROMPT, loras={"attn": 0.8}, **call)
    plain = alone(runtime, prompt=PROMPT, **call)
    assert np.abs(want - plain).max() > 2  # the adapter shows in the PNG
    assert np.abs(got - want).max() <= 1
    assert metric(server, "sdrt_unet_adapters_per_call_sum") >= 2  # 2 steps, 1 adapter


def test_concurrent_requests_with_different_adapters_share_unet_calls(server, runtime):
    """A with adapter attn, B with detail at 0.5, C without: each gets its own image alone,
    and U-Net calls carried two distinct adapters at once."""
    wanted = [{"attn": 1.0}, {"detail": 0.5}, {}]
    steps = 20
    one_adapter = metric(server, 'sdrt_unet_adapters_per_call_bucket{le="1"')
    calls = metric(server, "sdrt_unet_adapters_per_call_count")
    barrier = threading.Barrier(len(wanted))

    def request(loras):
        barrier.wait()
        fields = {**CALL, "num_inference_steps": steps, "loras": loras}
        return post(server, "/v1/images/generations", json=fields)

    with ThreadPoolExecutor(len(wanted)) as pool:
        replies = list(pool.map(request, wanted))
    call = {"num_inference_steps": steps, "seed": 3, "height": 64, "width": 64}
    for loras, reply in zip(wanted, replies, strict=True):
        assert reply.status_code == 200, reply.text
        want = alone(runtime, prompt=PROMPT, loras=loras, **call)
        assert np.abs(pixels(png(reply.json()["data"][0]["b64_json"])) - want).max() <= 1
    several = (metric(server, "sdrt_unet_adapters_per_call_count") - calls) - (
        metric(server, 'sdrt_unet_adapters_per_call_bucket{le="1"') - one_adapter
    )
    assert several > 0  # some U-Net calls carried both adapters


def test_edit_request_takes_loras_as_a_json_form_field(server, runtime):
    from PIL import Image

    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, format="PNG")
    form = {"prompt": PROMPT, "num_inference_steps": "2", "seed": "3", "strength": "0.5"}
    files = {"image": ("red.png", picture.getvalue(), "image/png")}
    replies = [
        post(server, "/v1/images/edits", data={**form, **extra}, files=files)
        for extra in ({"loras": json.dumps({"attn": 1.0})}, {})
    ]
    assert all(reply.status_code == 200 for reply in replies), replies[0].text
    with_lora, without = (pixels(png(r.json()["data"][0]["b64_json"])) for r in replies)
    assert np.abs(with_lora - without).max() > 2
    bad = post(server, "/v1/images/edits", data={**form, "loras": "{oops"}, files=files)
    assert bad.status_code == 400 and "loras must be a JSON object" in bad.text


def test_unknown_adapter_is_a_400_in_one_line(server):
    reply = post(server, "/v1/images/generations", json={**CALL, "loras": {"nope": 1.0}})
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "unknown LoRA 'nope'" in message and "\n" not in message


@pytest.mark.parametrize("path", ["../spare/ff.safetensors", "/etc/passwd", ""])
def test_post_refuses_paths_outside_the_lora_dir(server, path):
    reply = post(server, "/v1/loras", json={"name": "x", "path": path})
    assert reply.status_code == 400
    assert "\n" not in reply.json()["error"]["message"]
    assert names(server) == PRELOADED


def test_post_needs_the_api_key_then_loads_and_delete_unloads(server, folders):
    shutil.copy(folders["spare"] / "ff.safetensors", folders["loras"] / "ff2.safetensors")
    body = {"name": "ff", "path": "ff2.safetensors"}
    anonymous = httpx.post(f"{server.url}/v1/loras", json=body, timeout=60)
    assert anonymous.status_code == 401 and names(server) == PRELOADED
    reply = post(server, "/v1/loras", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["data"][0]["rank"] == 4
    assert names(server) == [*PRELOADED, "ff"]
    assert post(server, "/v1/images/generations", json={**CALL, "loras": {"ff": 1}}).is_success
    deleted = httpx.delete(f"{server.url}/v1/loras/ff", headers=AUTH)
    assert deleted.status_code == 200 and names(server) == PRELOADED
    assert httpx.delete(f"{server.url}/v1/loras/ff", headers=AUTH).status_code == 404


def test_max_loras_sizes_the_pool_and_a_full_one_evicts_the_least_recently_used(folders, tmp_path):
    """`--max-loras 2` with three files preloaded (by name: attn, detail, ff3): the first is
    evicted for the third; loading one more evicts the least recently used, and a request
    naming it then gets a 400."""
    for name in PRELOADED:
        shutil.copy(folders["loras"] / f"{name}.safetensors", tmp_path)
    shutil.copy(folders["spare"] / "ff.safetensors", tmp_path / "ff3.safetensors")
    options = ["--api-key", KEY, "--lora-dir", str(tmp_path), "--max-loras", "2"]
    process = ServeProcess([folders["bundle"]], options).start()
    try:
        assert names(process) == ["detail", "ff3"]
        used = post(process, "/v1/images/generations", json={**CALL, "loras": {"detail": 1}})
        assert used.is_success
        shutil.copy(folders["spare"] / "ff.safetensors", tmp_path / "ff4.safetensors")
        loaded = post(process, "/v1/loras", json={"name": "ff", "path": "ff4.safetensors"})
        assert loaded.status_code == 200, loaded.text
        assert names(process) == ["detail", "ff"]  # ff3, the least recently used, evicted
        gone = post(process, "/v1/images/generations", json={**CALL, "loras": {"ff3": 1}})
        assert gone.status_code == 400 and "unknown LoRA 'ff3'" in gone.text
    finally:
        assert process.stop() == 0


def test_openapi_describes_the_lora_routes_and_fields_and_post_refuses_unknown_fields(server):
    api = httpx.get(f"{server.url}/openapi.json").json()
    routes = {path: set(ops) for path, ops in api["paths"].items() if "loras" in path}
    assert routes == {"/v1/loras": {"get", "post"}, "/v1/loras/{name}": {"delete"}}
    post_op = api["paths"]["/v1/loras"]["post"]
    assert post_op["security"] == [{"apiKey": []}]
    body = post_op["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/LoadLoraRequest"}
    schemas = api["components"]["schemas"]
    assert set(schemas["LoadLoraRequest"]["required"]) == {"name", "path"}
    form_loras = schemas["CreateImageEditRequest"]["properties"]["loras"]
    assert form_loras["type"] == "string" and form_loras["contentMediaType"] == "application/json"
    generation_loras = schemas["CreateImageRequest"]["properties"]["loras"]["anyOf"][0]
    assert generation_loras["additionalProperties"] == {"type": "number"}
    extra = post(server, "/v1/loras", json={"name": "x", "path": "attn.safetensors", "scale": 1})
    assert extra.status_code == 400 and "unknown field 'scale'" in extra.text
    assert names(server) == PRELOADED
