"""The numpy runtime reproduces eager diffusers given the same latents, and checks its input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from pipeline_parity import txt2img_difference

from sdrt import Pipeline
from sdrt.errors import UserError

NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    return Pipeline.load(tiny_bundle, device="cpu")


@pytest.mark.parametrize("scheduler", ["pndm", "dpmpp_2m", "ddim", "euler"])
def test_matches_diffusers_on_the_same_latents(runtime, tiny_pipe, scheduler):
    height, width = 64, 96  # non-square
    latents = np.random.default_rng(3).standard_normal((1, 4, height // 8, width // 8), np.float32)
    call = {"num_inference_steps": 8, "guidance_scale": 7.5, "height": height, "width": width}
    # measured 1.4e-6 to 2.3e-6 (2026-12-01); images are in [0, 1]
    assert txt2img_difference(runtime, tiny_pipe, scheduler, latents, NEGATIVE, **call) <= 1e-5


def test_no_guidance_runs_the_unet_on_an_undoubled_batch(runtime, monkeypatch):
    unet = runtime.engines["unet"]
    batches = []
    original = unet.run

    def recording_run(feeds):
        batches.append(len(feeds["sample"]))
        return original(feeds)

    monkeypatch.setattr(unet, "run", recording_run)
    runtime("cat", num_inference_steps=2, guidance_scale=1.0, scheduler="ddim", output_type="np")
    runtime("cat", num_inference_steps=2, guidance_scale=7.5, scheduler="ddim", output_type="np")
    assert batches == [1, 1, 2, 2]


def test_seed_reproduces_and_different_seeds_differ(runtime):
    def image(seed):
        return runtime("cat", num_inference_steps=3, seed=seed, output_type="np").images

    assert np.array_equal(image(1), image(1))
    assert not np.array_equal(image(1), image(2))


def test_batch_of_prompts_returns_one_image_each_and_timings(runtime):
    out = runtime(["cat", "dog"], num_inference_steps=2)
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    for stage in ("text_encoder_ms", "unet_ms", "unet_step_ms", "vae_decode_ms", "total_ms"):
        assert out.timings[stage] > 0, stage
    assert out.timings["total_ms"] >= out.timings["unet_ms"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 60}, "height must be a positive multiple of 16"),
        ({"width": 72}, "width must be a positive multiple of 16"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
        ({"scheduler": "warp_drive"}, "unknown scheduler 'warp_drive'"),
        ({"prompt": 123}, "prompt must be a string"),
        ({"prompt": ["a", 5]}, "prompt must be a string"),
        ({"negative_prompt": ["a", "b"]}, "2 negative prompts for 1 prompts"),
        ({"output_type": "tensor"}, "output_type must be"),
        ({"latents": np.zeros((1, 4, 3, 3), np.float32)}, "latents have shape"),
    ],
)
def test_bad_input_is_one_clear_error(runtime, kwargs, message):
    call = {"prompt": "cat", "num_inference_steps": 2, **kwargs}
    with pytest.raises(UserError, match=message):
        runtime(**call)


def test_generation_never_imports_torch(tiny_bundle):
    script = textwrap.dedent(f"""
        import sys
        from sdrt import Pipeline
        out = Pipeline.load({str(tiny_bundle)!r}, device="cpu")("cat", num_inference_steps=2)
        assert out.images[0].size == (64, 64)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in
                        ("torch", "diffusers", "transformers"))
        print("LEAKED", leaked)
        sys.exit(1 if leaked else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_load_reports_milliseconds_for_the_bundle_and_each_engine(tiny_bundle):
    start = time.perf_counter()
    pipe = Pipeline.load(tiny_bundle, device="cpu")
    wall_ms = 1000 * (time.perf_counter() - start)
    timings = pipe.load_timings
    assert list(timings) == ["bundle", "verify", *pipe.engines, "total"]
    assert all(ms > 0 for ms in timings.values())
    # engines load in parallel, beside the hash checks: each part fits in the total, not the sum
    assert max(ms for name, ms in timings.items() if name != "total") <= timings["total"]
    assert timings["bundle"] + max(timings[name] for name in pipe.engines) <= timings["total"]
    assert timings["total"] <= wall_ms


@pytest.mark.parametrize(
    ("backend", "options", "line"),
    [
        (
            "onnxruntime",
            {"foo": 1},
            "Pipeline.load got unknown option foo for backend 'onnxruntime'; it takes "
            "static_shapes, cuda_graph, cuda_options, graph_cache, threads",
        ),
        (
            "tensorrt",
            {"graph_cache": False, "threads": 2},
            "Pipeline.load got unknown options graph_cache, threads for backend 'tensorrt'; it "
            "takes cuda_graph, tensorrt_module",
        ),
    ],
)
def test_an_unknown_load_option_is_named_with_the_backends_own(tiny_bundle, backend, options, line):
    with pytest.raises(UserError) as refused:
        Pipeline.load(tiny_bundle, backend=backend, device="cpu", **options)
    assert str(refused.value) == line + " (beside backend, device, verify, trusted_key)"


def test_engines_load_in_parallel_beside_the_hash_checks(tiny_bundle, monkeypatch):
    """Each ONNX Runtime engine loads on its own thread while the hashes are checked: every
    load and the check wait at one barrier, which a serial load would never fill."""
    import threading

    import sdrt.pipeline as pipeline

    names = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    barrier = threading.Barrier(len(names) + 1, timeout=30)
    load_engine, verify = pipeline.load_engine, pipeline._verify

    def meet_then(call):
        def wrapped(*args, **kwargs):
            barrier.wait()
            return call(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(pipeline, "load_engine", meet_then(load_engine))
    monkeypatch.setattr(pipeline, "_verify", meet_then(verify))
    pipe = Pipeline.load(tiny_bundle, device="cpu")
    assert list(pipe.engines) == names  # in the bundle's order, however the threads finished
