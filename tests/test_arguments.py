"""Every generation argument is checked once, where the CLI, the Python API and the server
meet (`sdrt.arguments.check_arguments`): numpy scalars are accepted, what cannot be meant is
refused in one sentence, and a value the user gave is never replaced by a default."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdrt import Pipeline
from sdrt.arguments import Limits, check_arguments
from sdrt.errors import UserError
from sdrt.image_inputs import image_to_pixels


@pytest.fixture(scope="module")
def pipe(tiny_bundle) -> Pipeline:
    return Pipeline.load(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


LATENT_NAN = np.full((1, 4, 8, 8), np.nan, np.float32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0, got nan"),
        ({"guidance_scale": np.float32("inf")}, "guidance_scale must be a finite number"),
        ({"num_inference_steps": True}, "num_inference_steps must be an integer >= 1, got True"),
        ({"height": 0}, "height must be a positive multiple of 16 for this model, got 0"),
        ({"width": 0}, "width must be a positive multiple of 16 for this model, got 0"),
        ({"strength": 0.5}, "strength 0.5 needs an image to start from"),
        ({"latents": LATENT_NAN}, "latents must be finite numbers"),
        ({"seed": "7"}, "seed must be an integer or None, got '7'"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"scheduler": "pndm", "num_inference_steps": 1000}, "more than the pndm scheduler"),
        ({"scheduler": "lcm", "num_inference_steps": 51}, "lcm: num_inference_steps 51"),
        (
            {"scheduler": "flow_match_euler"},
            "scheduler 'flow_match_euler' is for a flow-matching model, not this bundle's; "
            "choose one of ddim, ddpm",
        ),
        ({"prompt": "caf\udcff"}, "is not valid Unicode"),
        ({"prompt": ["cat"] * 17}, "17 images asked for, at most 16 per request"),
        ({"height": 8192, "width": 8192}, "8192x8192 is 67108864 pixels, above the limit"),
        ({"output_type": "jpg"}, "output_type must be 'pil' or 'np'"),
    ],
)
def test_values_that_cannot_be_meant_are_refused(pipe, call, message):
    with pytest.raises(UserError, match=_literal(message)):
        pipe.arguments(**{"prompt": "cat", **call})


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("photo.png", "image must be a PIL image or an array, got the path 'photo.png'"),
        (np.zeros((3, 64, 64), np.uint8), "channels first (CHW)"),
        (np.full((64, 64, 3), 200.0, np.float32), "float array must hold values in [0, 1]"),
        (np.full((64, 64, 3), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((64, 64, 3), np.int64), "dtype int64"),
    ],
)
def test_pictures_that_would_be_guessed_at_are_refused(pipe, image, message):
    with pytest.raises(UserError, match=_literal(message)):
        pipe.arguments(prompt="cat", image=image)


def test_strength_zero_is_refused_not_replaced(pipe, picture):
    with pytest.raises(UserError, match=_literal("strength must be in (0, 1], got 0.0")):
        pipe.arguments(prompt="cat", image=picture, strength=0)


def test_unknown_device_is_refused(tiny_bundle):
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        Pipeline.load(tiny_bundle, device="gpu")


def test_numpy_scalars_mean_what_python_numbers_mean(pipe):
    plain = pipe(
        "cat", num_inference_steps=2, guidance_scale=7.5, seed=3, height=64, output_type="np"
    )
    numpy = pipe(
        "cat",
        num_inference_steps=np.int64(2),
        guidance_scale=np.float32(7.5),
        seed=np.int64(3),
        height=np.int32(64),
        output_type="np",
    )
    np.testing.assert_array_equal(plain.images, numpy.images)


def test_sixteen_bit_grayscale_is_read_as_gray_not_white():
    values = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 256
    eight = image_to_pixels(Image.fromarray(values.astype(np.uint8)).convert("RGB"), 64, 64)
    sixteen = image_to_pixels(Image.fromarray(values * 257), 64, 64)  # same grays, 16-bit
    assert Image.fromarray(values * 257).mode == "I;16"
    np.testing.assert_allclose(sixteen, eight, atol=1e-6)
    as_array = np.repeat((values * 257)[..., None], 3, axis=2)  # uint16 HWC
    np.testing.assert_allclose(image_to_pixels(as_array, 64, 64), eight, atol=1e-6)


def test_input_picture_above_the_pixel_limit_is_refused_before_decoding(pipe, tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (6000, 3000)).save(path)  # a few KB on disk, 18 megapixels declared
    with Image.open(path) as lazy, pytest.raises(UserError, match="18000000 pixels, above"):
        pipe.arguments(prompt="cat", image=lazy)


def test_limits_can_be_raised(pipe):
    before = pipe.limits
    pipe.limits = Limits(max_images=32)
    try:
        assert len(pipe.arguments(prompt=["cat"] * 17).prompts) == 17
    finally:
        pipe.limits = before


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_a_flow_bundle_takes_only_flow_schedulers_at_any_step_count(pipe):
    # A flow-matching manifest (Flux-dev's dynamic-shift config): no mu is known here, and the
    # continuous schedule has no repeated timesteps to refuse.
    config = {"use_dynamic_shifting": True, "shift": 3.0, "num_train_timesteps": 1000}
    manifest = {**pipe.manifest, "scheduler": "flow_match_euler", "scheduler_config": config}
    for steps in (1, 28, 1000):
        args = check_arguments(manifest, pipe.engines, "cat", num_inference_steps=steps)
        assert (args.scheduler, args.num_inference_steps) == ("flow_match_euler", steps)
    with pytest.raises(UserError, match=_literal("scheduler 'ddim' is for a noise-predicting")):
        check_arguments(manifest, pipe.engines, "cat", scheduler="ddim")
