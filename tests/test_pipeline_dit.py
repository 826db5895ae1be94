"""Diffusion transformers (SD3 / SD3.5 MMDiT-X and Flux.1 dev / schnell) match diffusers'
StableDiffusion3Pipeline and FluxPipeline (0.42.1) on the same latents: batch 2, non-square
sizes, negative prompts and classifier-free guidance (SD3), embedded guidance (Flux-dev), no
guidance, img2img; and the T5 tokenizer gives transformers' ids."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
from diffusers.pipelines.flux import pipeline_flux_img2img
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img
from test_pipeline_variants import noise, patch_vae_sampling, queued, random_image

from sdrt import Pipeline
from sdrt.errors import UserError
from sdrt.families.flux import Packed2x2
from sdrt.t5_tokenizer import T5Tokenizer

PROMPTS = ["a photo of a cat on a red chair", "The dog, at dawn!"]
NEGATIVES = ["blurry", "a cat"]
# Max abs image difference (images in [0, 1]); measured 2.3e-6 to 4.5e-6 on the 2-core CPU
# machine, 2026-12-03. Without the shift factor it is 3.5e-2, with a wrong packing order 1.0.
TOLERANCE = 1e-5
T5_LENGTH = 16  # the tiny presets' max_sequence_length


def packed(runtime: Pipeline, latents: np.ndarray) -> np.ndarray:
    """Latents in the token layout diffusers' FluxPipeline takes them in."""
    _, _, h, w = latents.shape
    return Packed2x2({}, h // 2, w // 2).to_model(latents)


def eager(pipe, latents, **call) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(
            latents=torch.from_numpy(latents),
            output_type="np",
            max_sequence_length=T5_LENGTH,
            **call,
        )
    return np.asarray(out.images, np.float32)


@pytest.mark.parametrize(
    ("guidance", "negative", "batch", "size"),
    [
        (4.5, NEGATIVES, 2, (64, 96)),  # guided, with negative prompts, non-square
        (3.0, None, 1, (96, 64)),  # guided with "" as the negative
        (1.0, None, 2, (64, 64)),  # no classifier-free guidance
    ],
)
def test_sd3_matches_diffusers(preset_bundle, guidance, negative, batch, size):
    pipe, bundle = preset_bundle("tiny-sd3")
    runtime = Pipeline.load(bundle, device="cpu")
    height, width = size
    latents = noise((batch, 16, height // 8, width // 8), batch)
    call = {"num_inference_steps": 4, "guidance_scale": guidance, "height": height, "width": width}
    negatives = None if negative is None else negative[:batch]
    ours = runtime(
        PROMPTS[:batch], negative_prompt=negatives, latents=latents, output_type="np", **call
    )
    want = eager(pipe, latents, prompt=PROMPTS[:batch], negative_prompt=negatives, **call)
    assert runtime.manifest["family"] == "sd3" and runtime.guided(
        runtime.arguments(prompt="x", guidance_scale=guidance)
    ) == (guidance > 1)
    assert np.abs(ours.images - want).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("preset", "guidance", "batch", "size"),
    [
        ("tiny-flux", 3.5, 2, (64, 96)),  # dev: the scale as a per-row input
        ("tiny-flux", 7.0, 1, (96, 64)),
        ("tiny-flux-schnell", 0.0, 2, (64, 64)),  # no guidance at all
    ],
)
def test_flux_matches_diffusers(preset_bundle, preset, guidance, batch, size):
    pipe, bundle = preset_bundle(preset)
    runtime = Pipeline.load(bundle, device="cpu")
    assert ("guidance" in runtime.denoiser.inputs) == (preset == "tiny-flux")
    height, width = size
    latents = noise((batch, 16, height // 8, width // 8), 10 + batch)
    call = {"num_inference_steps": 4, "guidance_scale": guidance, "height": height, "width": width}
    ours = runtime(PROMPTS[:batch], latents=latents, output_type="np", **call)
    want = eager(pipe, packed(runtime, latents), prompt=PROMPTS[:batch], **call)
    assert np.abs(ours.images - want).max() <= TOLERANCE


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_img2img_matches_diffusers(preset_bundle, monkeypatch, preset):
    pipe, bundle = preset_bundle(preset)
    runtime = Pipeline.load(bundle, device="cpu")
    image, seed, shape = random_image(2, (64, 96)), 3, (1, 16, 8, 12)
    rng = np.random.default_rng(seed)
    start_noise, vae_noise = (rng.standard_normal(shape, np.float32) for _ in range(2))
    patch_vae_sampling(monkeypatch, [vae_noise])
    flux = preset == "tiny-flux"
    module = pipeline_flux_img2img if flux else pipeline_stable_diffusion_3_img2img
    monkeypatch.setattr(module, "randn_tensor", queued([start_noise]))
    # strength 0.65 of 10 steps: diffusers' flow pipelines start at step int(10 - 6.5) = 3
    call = {"num_inference_steps": 10, "guidance_scale": 3.5, "strength": 0.65, "height": 64}
    call["width"] = 96
    ours = runtime(PROMPTS[0], image=image, seed=seed, output_type="np", **call)
    eager_pipe = (FluxImg2ImgPipeline if flux else StableDiffusion3Img2ImgPipeline)(
        **pipe.components
    )
    eager_pipe.set_progress_bar_config(disable=True)
    pixels = image.astype(np.float32)[None] / 255.0
    want = eager_pipe(
        PROMPTS[0], image=pixels, output_type="np", max_sequence_length=T5_LENGTH, **call
    ).images
    assert np.abs(ours.images - want).max() <= TOLERANCE


def test_t5_tokenizer_gives_transformers_ids(preset_bundle):
    pipe, bundle = preset_bundle("tiny-sd3")
    ours = T5Tokenizer.from_dir(bundle / "tokenizer_3")
    prompts = [
        "a photo of a cat",
        "",
        "A  very long prompt, with MANY words that will surely be truncated here",
        " lead\tand\nunknown ✓ characters  ",
    ]
    want = pipe.tokenizer_3(prompts, padding="max_length", max_length=T5_LENGTH, truncation=True)
    assert (ours.encode(prompts, T5_LENGTH) == np.array(want.input_ids)).all()


def test_dit_bundles_declare_schema_version_2_and_unet_bundles_stay_1(preset_bundle):
    for preset, version in (("tiny-sd3", 2), ("tiny-flux", 2), ("tiny", 1)):
        runtime = Pipeline.load(preset_bundle(preset)[1], device="cpu")
        assert runtime.manifest["schema_version"] == version


def test_flow_models_refuse_other_schedulers_and_masks(preset_bundle):
    runtime = Pipeline.load(preset_bundle("tiny-flux")[1], device="cpu")
    with pytest.raises(UserError, match="for a noise-predicting model, not this bundle's"):
        runtime("x", scheduler="euler", num_inference_steps=2)
    with pytest.raises(UserError, match="inpainting"):
        runtime("x", image=random_image(0), mask_image=np.ones((64, 64)), num_inference_steps=2)


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_transformer_generation_never_imports_torch(preset_bundle, preset):
    bundle = preset_bundle(preset)[1]
    script = textwrap.dedent(f"""
        import sys
        from sdrt import Pipeline
        pipe = Pipeline.load({str(bundle)!r}, device="cpu")
        out = pipe("cat", num_inference_steps=2, image=None)
        assert out.images[0].size == (64, 64)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in
                        ("torch", "diffusers", "transformers"))
        print("LEAKED", leaked)
        sys.exit(1 if leaked else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
