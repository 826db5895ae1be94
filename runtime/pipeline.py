"""The denoising loop: prompt -> token ids -> embeddings -> latents -> image.

Mirrors diffusers' StableDiffusionPipeline call so that, given the same latents, the two produce
the same image; every model call goes through an Engine, everything else is numpy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Engine, load_engine
from .backends.base import upload_constants
from .bundle import Bundle
from .errors import UserError
from .image_inputs import (
    image_size,
    image_to_pixels,
    latent_mask,
    mask_to_array,
    sample_latents,
    strength_start,
)
from .images import decoded_to_numpy, numpy_to_pil
from .schedulers import SCHEDULERS, make_scheduler
from .tokenizer import ClipTokenizer


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, or float32 NHWC array in [0, 1] for output_type="np"
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage


class Timer:
    """Accumulates wall time per stage name, in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def __call__(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - start) * 1e3
        return now


class Pipeline:
    def __init__(
        self, bundle: Bundle, engines: dict[str, Engine], tokenizers: dict[str, ClipTokenizer]
    ):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.engines = engines
        self.tokenizers = tokenizers  # text encoder name -> its tokenizer

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        backend: str = "onnxruntime",
        device: str = "auto",
        verify: bool = True,
        trusted_key: str | Path | None = None,
        **backend_options: Any,
    ) -> Pipeline:
        """Validate the bundle and load each engine once; reuse the Pipeline across requests.

        With `trusted_key` (a PEM public key) the bundle must carry a valid signature by its
        private key (`sdrt sign`); unsigned or altered bundles are refused before loading.
        `backend_options` go to every engine (e.g. tensorrt's cuda_graph=True).
        """
        loaded = Bundle.load(bundle, verify_hashes=verify, trusted_key=trusted_key)
        engines = {
            name: load_engine(backend, loaded, name, device, **backend_options)
            for name in loaded.components
        }
        tokenizers = {
            name: ClipTokenizer.from_dir(folder) for name, folder in loaded.tokenizer_dirs().items()
        }
        return cls(loaded, engines, tokenizers)

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        output_type: str = "pil",
        progress: bool = False,
    ) -> PipelineOutput:
        """txt2img; img2img with `image` (+ `strength`); inpainting with `image` + `mask_image`.

        `latents` is the initial noise (B, C, H/8, W/8); without it, `seed` draws it.
        """
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = None
        if negative_prompt is not None:
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        default = image_size(image) if image is not None else self.manifest["default_size"]
        height, width = height or default[0], width or default[1]
        scheduler = scheduler or self.manifest["scheduler"]
        self._check(
            prompts,
            negatives,
            num_inference_steps,
            height,
            width,
            output_type,
            scheduler,
            image,
            mask_image,
        )
        timer, start = Timer(), time.perf_counter()
        guided = guidance_scale > 1.0 and not self.guidance_embedded
        unet = self.engines["unet"]
        cond = upload_constants(
            unet, self.conditioning(prompts, negatives, guided, guidance_scale, height, width)
        )
        tick = timer("text_encoder_ms", start)

        sched = make_scheduler(scheduler, self.manifest["scheduler_config"])
        sched.set_timesteps(num_inference_steps)
        rng = np.random.default_rng(seed)
        shape = self._latent_shape(len(prompts), height, width)
        noise = _initial_noise(shape, latents, rng)
        if image is None:
            timesteps, begin = sched.timesteps, None
            latents = noise * np.float32(sched.init_noise_sigma)
        else:
            first = strength_start(
                num_inference_steps,
                1.0 if strength is None and mask_image is not None else strength or 0.8,
            )
            begin = self._start_from_image(
                image, mask_image, height, width, noise, first, sched, rng
            )
            timesteps, latents = sched.timesteps[first * sched.order :], begin.latents
        extra = None if begin is None else begin.unet_extra  # 9-channel inpainting inputs
        if extra is not None and guided:
            extra = np.concatenate([extra] * 2)
        tick = timer("vae_encode_ms" if image is not None else "scheduler_ms", tick)

        for i, t in enumerate(_progress(timesteps, progress)):
            model_in = np.concatenate([latents] * 2) if guided else latents
            model_in = sched.scale_model_input(model_in, t)
            if extra is not None:
                model_in = np.concatenate([model_in, extra], axis=1)
            tick = timer("scheduler_ms", tick)
            noise_pred = unet.run(
                {"sample": model_in, "timestep": np.full(len(model_in), t, np.float32), **cond}
            )["noise_pred"]
            tick = timer("unet_ms", tick)
            if guided:
                uncond, text = np.split(noise_pred, 2)
                noise_pred = uncond + np.float32(guidance_scale) * (text - uncond)
            step_noise = rng.standard_normal(shape, np.float32) if sched.stochastic else None
            latents = sched.step(noise_pred, t, latents, noise=step_noise)
            if begin is not None and begin.blend_mask is not None:
                latents = _blend_known_region(sched, begin, latents, noise, timesteps, i)
            tick = timer("scheduler_ms", tick)

        images = self.decode_latents(latents)
        tick = timer("vae_decode_ms", tick)
        timer.ms["unet_step_ms"] = timer.ms.get("unet_ms", 0.0) / max(len(timesteps), 1)
        timer.ms["total_ms"] = (tick - start) * 1e3
        return PipelineOutput(numpy_to_pil(images) if output_type == "pil" else images, timer.ms)

    @property
    def inpainting_unet(self) -> bool:
        """9-channel U-Nets take the mask and masked-image latents beside the latents."""
        return self.manifest.get("unet_in_channels", 4) > self.manifest["latent_channels"]

    @property
    def guidance_embedded(self) -> bool:
        """Guidance-distilled U-Nets (LCM) take the scale as an input instead of a 2x batch."""
        return "timestep_cond" in self.engines["unet"].inputs

    def conditioning(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        guided: bool,
        guidance_scale: float,
        height: int,
        width: int,
    ) -> dict[str, np.ndarray]:
        """The U-Net inputs that stay fixed for the whole loop; `negatives` None means the
        model's own choice for no negative prompt (SDXL: zeros, others: "")."""
        zeros = guided and negatives is None and self.manifest.get("zero_negative_prompt", False)
        negatives = negatives or [""] * len(prompts)
        hidden, pooled = self.encode_prompts(
            negatives + prompts if guided and not zeros else prompts
        )
        if zeros:
            hidden = np.concatenate([np.zeros_like(hidden), hidden])
            pooled = None if pooled is None else np.concatenate([np.zeros_like(pooled), pooled])
        cond = {"encoder_hidden_states": hidden}
        unet_inputs = self.engines["unet"].inputs
        if "text_embeds" in unet_inputs and pooled is not None:
            # SDXL micro-conditioning: original size, crop top-left, target size
            cond["text_embeds"] = pooled
            cond["time_ids"] = np.tile(
                np.array([[height, width, 0, 0, height, width]], np.float32), (len(pooled), 1)
            )
        if self.guidance_embedded:
            cond["timestep_cond"] = guidance_embedding(
                np.full(len(prompts), guidance_scale - 1.0, np.float32),
                unet_inputs["timestep_cond"][1][-1],
            )
        return cond

    def encode_prompts(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Hidden states of every text encoder joined on the feature axis, and the pooled
        embedding of the last one that has it (SDXL); None for SD 1/2."""
        hidden, pooled = [], None
        for name, tokenizer in self.tokenizers.items():
            ids = tokenizer.encode(prompts, self.manifest["text_max_length"])
            out = self.engines[name].run({"input_ids": ids})
            hidden.append(out["text_embeddings"])
            pooled = out.get("pooled_embeddings", pooled)
        return np.concatenate(hidden, axis=-1), pooled

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        scaled = latents / np.float32(self.manifest["vae_scaling_factor"])
        if self.manifest.get("vae_shift_factor") is not None:
            scaled = scaled + np.float32(self.manifest["vae_shift_factor"])
        decoded = self.engines["vae_decoder"].run({"latent": scaled})["image"]
        return decoded_to_numpy(decoded)

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        scale = self.manifest["vae_scale_factor"]
        return (batch, self.manifest["latent_channels"], height // scale, width // scale)

    def encode_image(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Pixels in [-1, 1] -> scaled latents, sampled like diffusers' `latent_dist.sample`."""
        moments = self.engines["vae_encoder"].run({"image": pixels})["latent_moments"]
        noise = rng.standard_normal(
            (moments.shape[0], moments.shape[1] // 2, *moments.shape[2:]), np.float32
        )
        latents = sample_latents(moments, noise)
        if self.manifest.get("vae_shift_factor") is not None:
            latents = latents - np.float32(self.manifest["vae_shift_factor"])
        return latents * np.float32(self.manifest["vae_scaling_factor"])

    def _start_from_image(
        self,
        image: Any,
        mask_image: Any,
        height: int,
        width: int,
        noise: np.ndarray,
        first: int,
        sched: Any,
        rng: np.random.Generator,
    ) -> ImageStart:
        batch = noise.shape[0]
        pixels = image_to_pixels(image, height, width)
        sched.set_begin_index(first * sched.order)
        t_first = sched.timesteps[first * sched.order]
        image_latents = None
        if mask_image is None or first > 0 or not self.inpainting_unet:  # skip an unused encode
            image_latents = np.repeat(self.encode_image(pixels, rng), batch, axis=0)
        if mask_image is None:
            return ImageStart(sched.add_noise(image_latents, noise, t_first))
        mask = mask_to_array(mask_image, height, width)
        small_mask = np.repeat(latent_mask(mask, self.manifest["vae_scale_factor"]), batch, 0)
        if first == 0:  # full strength starts from pure noise, as in diffusers
            latents = noise * np.float32(sched.init_noise_sigma)
        else:
            latents = sched.add_noise(image_latents, noise, t_first)
        if not self.inpainting_unet:
            return ImageStart(latents, blend_mask=small_mask, image_latents=image_latents)
        masked = np.repeat(self.encode_image(pixels * (mask < 0.5), rng), batch, axis=0)
        return ImageStart(latents, unet_extra=np.concatenate([small_mask, masked], axis=1))

    def _check(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        steps: int,
        height: int,
        width: int,
        output_type: str,
        scheduler: str,
        image: Any,
        mask_image: Any,
    ) -> None:
        if negatives is not None and len(negatives) != len(prompts):
            raise UserError(
                f"got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                "pass one, or one per prompt"
            )
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        multiple = self.manifest.get("size_multiple", 8)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise UserError(
                    f"{name} must be a positive multiple of {multiple} for this "
                    f"model, got {value!r}"
                )
        if output_type not in ("pil", "np"):
            raise UserError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if scheduler not in SCHEDULERS:
            raise UserError(
                f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        if mask_image is not None and image is None:
            raise UserError("mask_image needs image: pass the picture to inpaint as well")
        if image is not None and "vae_encoder" not in self.engines:
            raise UserError(
                "this bundle has no vae_encoder, so it cannot do img2img or "
                "inpainting; re-export it"
            )
        if self.inpainting_unet and mask_image is None:
            raise UserError("this is an inpainting model: pass image and mask_image")


@dataclass
class ImageStart:
    """Where an img2img or inpainting loop starts, and what it carries along each step."""

    latents: np.ndarray
    unet_extra: np.ndarray | None = None  # mask + masked-image latents for 9-channel U-Nets
    blend_mask: np.ndarray | None = None  # 1 = repaint, for ordinary U-Nets
    image_latents: np.ndarray | None = None


def _blend_known_region(
    sched: Any,
    begin: ImageStart,
    latents: np.ndarray,
    noise: np.ndarray,
    timesteps: np.ndarray,
    i: int,
) -> np.ndarray:
    """Inpainting with an ordinary U-Net: keep the unmasked region on the image's noisy path."""
    known = begin.image_latents
    if i < len(timesteps) - 1:
        known = sched.add_noise(known, noise, timesteps[i + 1])
    return (1 - begin.blend_mask) * known + begin.blend_mask * latents


def _initial_noise(
    shape: tuple[int, ...], latents: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    if latents is None:
        return rng.standard_normal(shape, np.float32)
    if tuple(latents.shape) != shape:
        raise UserError(
            f"latents have shape {tuple(latents.shape)}, expected {shape} for "
            f"{shape[0]} prompt(s) at {shape[2]}x{shape[3]} latents"
        )
    return np.asarray(latents, np.float32)


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of the guidance scale that guidance-distilled U-Nets take."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -(np.log(10000.0) / (half - 1)))
    angles = (w.astype(np.float32) * 1000.0)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)


def _as_prompt_list(prompt: Any, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (
        not isinstance(prompts, (list, tuple))
        or not prompts
        or not all(isinstance(p, str) for p in prompts)
    ):
        raise UserError(
            f"{what} must be a string or a non-empty list of strings, got {type(prompt).__name__}"
        )
    return list(prompts)


def _progress(timesteps: np.ndarray, enabled: bool) -> Any:
    if not enabled:
        return timesteps
    from tqdm import tqdm

    return tqdm(timesteps, desc="denoising", unit="step", leave=False)
