"""Parity with the matching diffusers pipeline for each model variant and task: SD 2.x
v-prediction, LCM guidance embedding, Turbo (trailing, no guidance), img2img, inpainting with a
9-channel U-Net and with the mask-blend method. Same latents, same injected noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.models.autoencoders import vae as diffusers_vae
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img
from diffusers.schedulers import scheduling_lcm
from pipeline_parity import txt2img_difference

from sdrt import Pipeline
from sdrt.export.parity import diffusers_scheduler, run_diffusers

PROMPT = "a lighthouse on a cliff at dawn"
NEGATIVE = "fog"
# Max abs image difference (images in [0, 1]); measured 6.6e-7 to 6.6e-6 on the 2-core CPU
# machine, 2026-12-01 (SD 2 with euler the largest): 1e-3 would let a 0.2 % guidance error pass.
TOLERANCE = 1e-5


def noise(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def queued(arrays):
    """A stand-in for diffusers' randn_tensor that returns the given arrays in order."""
    queue = [torch.from_numpy(a) for a in arrays]

    def randn_tensor(shape, *args, **kwargs):
        return queue.pop(0).reshape(shape)

    return randn_tensor


def patch_vae_sampling(monkeypatch, draws):
    """diffusers' latent_dist.sample() uses the noise our runtime draws from the same seed."""
    queue = [torch.from_numpy(d) for d in draws]
    monkeypatch.setattr(
        diffusers_vae.DiagonalGaussianDistribution,
        "sample",
        lambda self, generator=None: self.mean + self.std * queue.pop(0),
    )


def test_sd2_v_prediction_matches(preset_bundle):
    pipe, bundle = preset_bundle("tiny-sd2")
    runtime = Pipeline.load(bundle, device="cpu")
    assert runtime.manifest["prediction_type"] == "v_prediction"
    call = {"num_inference_steps": 6, "guidance_scale": 5.0, "height": 64, "width": 96}
    for scheduler in ("ddim", "euler"):
        difference = txt2img_difference(
            runtime, pipe, scheduler, noise((1, 4, 8, 12), 0), NEGATIVE, **call
        )
        assert difference <= TOLERANCE, scheduler


def test_lcm_guidance_embedding_matches(preset_bundle, monkeypatch):
    pipe, bundle = preset_bundle("tiny-lcm")
    runtime = Pipeline.load(bundle, device="cpu")
    assert runtime.guidance_embedded
    steps, seed, latents = 4, 11, noise((1, 4, 8, 8), 1)
    rng = np.random.default_rng(seed)  # the runtime's per-step noise, in order
    monkeypatch.setattr(
        scheduling_lcm,
        "randn_tensor",
        queued([rng.standard_normal(latents.shape, np.float32) for _ in range(steps)]),
    )
    ours = runtime(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=8.0,
        scheduler="lcm",
        seed=seed,
        latents=latents,
        output_type="np",
    )
    eager = run_diffusers(
        pipe, "lcm", latents, prompt=PROMPT, num_inference_steps=steps, guidance_scale=8.0
    )
    assert np.abs(ours.images - eager).max() <= TOLERANCE


def test_turbo_single_step_without_guidance_matches(preset_bundle):
    pipe, bundle = preset_bundle("tiny-turbo")
    runtime = Pipeline.load(bundle, device="cpu")
    assert runtime.manifest["scheduler"] == "euler"
    assert runtime.manifest["scheduler_config"]["timestep_spacing"] == "trailing"
    latents = noise((1, 4, 8, 8), 2)
    ours = runtime(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=latents, output_type="np"
    )
    eager = run_diffusers(
        pipe, "euler", latents, prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0
    )
    assert np.abs(ours.images - eager).max() <= TOLERANCE


def random_image(seed, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (*size, 3)) * 255).astype(np.uint8)


IMG2IMG_CASES = [
    ("tiny", "ddim", 7.5),
    ("tiny", "euler", 7.5),
    ("tiny", "dpmpp_2m", 7.5),
    ("tiny-sdxl", "euler", 5.0),
]


@pytest.mark.parametrize(("preset", "scheduler", "guidance"), IMG2IMG_CASES)
def test_img2img_matches(preset_bundle, monkeypatch, preset, scheduler, guidance):
    pipe, bundle = preset_bundle(preset)
    runtime = Pipeline.load(bundle, device="cpu")
    xl = runtime.manifest["family"] == "sdxl"
    image, seed, shape = random_image(0), 4, (1, 4, 8, 8)
    rng = np.random.default_rng(seed)
    start_noise, vae_noise = (rng.standard_normal(shape, np.float32) for _ in range(2))
    patch_vae_sampling(monkeypatch, [vae_noise])
    module = pipeline_stable_diffusion_xl_img2img if xl else pipeline_stable_diffusion_img2img
    monkeypatch.setattr(module, "randn_tensor", queued([start_noise]))
    call = {"num_inference_steps": 10, "guidance_scale": guidance, "strength": 0.6}
    ours = runtime(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=image,
        scheduler=scheduler,
        seed=seed,
        output_type="np",
        **call,
    )
    eager_class = StableDiffusionXLImg2ImgPipeline if xl else StableDiffusionImg2ImgPipeline
    eager_pipe = eager_class(**pipe.components)
    eager_pipe.scheduler = diffusers_scheduler(scheduler, dict(pipe.scheduler.config))
    eager_pipe.set_progress_bar_config(disable=True)
    pixels = image.astype(np.float32)[None] / 255.0
    eager = eager_pipe(
        PROMPT, negative_prompt=NEGATIVE, image=pixels, output_type="np", **call
    ).images
    assert np.abs(ours.images - eager).max() <= TOLERANCE


@pytest.mark.parametrize("preset", ["tiny-inpaint", "tiny"])
def test_inpainting_matches(preset_bundle, monkeypatch, preset):
    pipe, bundle = preset_bundle(preset)
    runtime = Pipeline.load(bundle, device="cpu")
    image, seed, latents = random_image(1), 6, noise((1, 4, 8, 8), 3)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 8:40] = 1.0
    rng = np.random.default_rng(seed)
    # 9 channels: one encode (the masked image); mask blend: one (the image) then an unused one
    vae_draws = [rng.standard_normal(latents.shape, np.float32), np.zeros_like(latents)]
    patch_vae_sampling(monkeypatch, vae_draws)
    call = {"num_inference_steps": 6, "guidance_scale": 7.5}
    ours = runtime(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=image,
        mask_image=mask,
        scheduler="ddim",
        seed=seed,
        latents=latents,
        output_type="np",
        **call,
    )
    eager_pipe = StableDiffusionInpaintPipeline(**pipe.components)
    eager_pipe.scheduler = diffusers_scheduler("ddim", dict(pipe.scheduler.config))
    eager_pipe.set_progress_bar_config(disable=True)
    eager = eager_pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=image.astype(np.float32)[None] / 255.0,
        mask_image=mask[None, :, :, None],
        latents=torch.from_numpy(latents),
        output_type="np",
        **call,
    ).images
    assert np.abs(ours.images - eager).max() <= TOLERANCE


def test_inpainting_model_requires_a_mask(preset_bundle):
    _, bundle = preset_bundle("tiny-inpaint")
    runtime = Pipeline.load(bundle, device="cpu")
    from sdrt.errors import UserError

    with pytest.raises(UserError, match="inpainting model"):
        runtime(PROMPT, num_inference_steps=2)
    with pytest.raises(UserError, match="mask_image needs image"):
        runtime(PROMPT, mask_image=np.zeros((64, 64)), num_inference_steps=2)
    with pytest.raises(UserError, match="strength must be in"):
        runtime(
            PROMPT,
            image=random_image(0),
            mask_image=np.zeros((64, 64)),
            strength=1.5,
            num_inference_steps=2,
        )


@pytest.mark.parametrize("negative", [NEGATIVE, None])
def test_sdxl_two_encoders_pooled_and_time_ids_match(preset_bundle, negative):
    pipe, bundle = preset_bundle("tiny-sdxl")
    runtime = Pipeline.load(bundle, device="cpu")
    assert set(runtime.engines) >= {"text_encoder", "text_encoder_2"}
    assert runtime.manifest["family"] == "sdxl"
    assert runtime.manifest["zero_negative_prompt"] is True
    call = {"num_inference_steps": 5, "guidance_scale": 6.0, "height": 64, "width": 96}
    difference = txt2img_difference(
        runtime, pipe, "euler", noise((1, 4, 8, 12), 5), negative, **call
    )
    assert difference <= TOLERANCE
