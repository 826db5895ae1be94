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
from .bundle import Bundle
from .errors import UserError
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
    def __init__(self, bundle: Bundle, engines: dict[str, Engine], tokenizer: ClipTokenizer):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.engines = engines
        self.tokenizer = tokenizer

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        backend: str = "onnxruntime",
        device: str = "auto",
        verify: bool = True,
    ) -> Pipeline:
        """Validate the bundle and load each engine once; reuse the Pipeline across requests."""
        loaded = Bundle.load(bundle, verify_hashes=verify)
        engines = {name: load_engine(backend, loaded, name, device) for name in loaded.components}
        return cls(loaded, engines, ClipTokenizer.from_dir(loaded.tokenizer_dir))

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
        output_type: str = "pil",
        progress: bool = False,
    ) -> PipelineOutput:
        prompts = _as_prompt_list(prompt, "prompt")
        negatives = _as_prompt_list(negative_prompt or "", "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        height, width = (
            height or self.manifest["default_size"][0],
            width or self.manifest["default_size"][1],
        )
        self._check(prompts, negatives, num_inference_steps, height, width, output_type)
        scheduler = scheduler or self.manifest["scheduler"]
        if scheduler not in SCHEDULERS:
            raise UserError(
                f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        timer, start = Timer(), time.perf_counter()
        guided = guidance_scale > 1.0
        embeddings = self.encode_prompts(negatives + prompts if guided else prompts)
        tick = timer("text_encoder_ms", start)

        sched = make_scheduler(scheduler, self.manifest["scheduler_config"])
        sched.set_timesteps(num_inference_steps)
        rng = np.random.default_rng(seed)
        latents = self._initial_latents(len(prompts), height, width, latents, rng)
        latents = latents * np.float32(sched.init_noise_sigma)
        tick = timer("scheduler_ms", tick)
        unet = self.engines["unet"]
        for t in _progress(sched.timesteps, progress):
            model_in = np.concatenate([latents] * 2) if guided else latents
            model_in = sched.scale_model_input(model_in, t)
            tick = timer("scheduler_ms", tick)
            noise_pred = unet.run(
                {
                    "sample": model_in,
                    "timestep": np.full(len(model_in), t, np.float32),
                    "encoder_hidden_states": embeddings,
                }
            )["noise_pred"]
            tick = timer("unet_ms", tick)
            if guided:
                uncond, cond = np.split(noise_pred, 2)
                noise_pred = uncond + np.float32(guidance_scale) * (cond - uncond)
            noise = rng.standard_normal(latents.shape, np.float32) if sched.stochastic else None
            latents = sched.step(noise_pred, t, latents, noise=noise)
            tick = timer("scheduler_ms", tick)

        images = self.decode_latents(latents)
        tick = timer("vae_decode_ms", tick)
        timer.ms["unet_step_ms"] = timer.ms.get("unet_ms", 0.0) / max(len(sched.timesteps), 1)
        timer.ms["total_ms"] = (tick - start) * 1e3
        return PipelineOutput(numpy_to_pil(images) if output_type == "pil" else images, timer.ms)

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer.encode(prompts, self.manifest["text_max_length"])
        return self.engines["text_encoder"].run({"input_ids": ids})["text_embeddings"]

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        scaled = latents / np.float32(self.manifest["vae_scaling_factor"])
        if self.manifest.get("vae_shift_factor") is not None:
            scaled = scaled + np.float32(self.manifest["vae_shift_factor"])
        decoded = self.engines["vae_decoder"].run({"latent": scaled})["image"]
        return decoded_to_numpy(decoded)

    def _initial_latents(
        self,
        batch: int,
        height: int,
        width: int,
        latents: np.ndarray | None,
        rng: np.random.Generator,
    ) -> np.ndarray:
        scale = self.manifest["vae_scale_factor"]
        shape = (batch, self.manifest["latent_channels"], height // scale, width // scale)
        if latents is None:
            return rng.standard_normal(shape, np.float32)
        if tuple(latents.shape) != shape:
            raise UserError(
                f"latents have shape {tuple(latents.shape)}, expected {shape} for "
                f"{batch} prompt(s) at {height}x{width}"
            )
        return np.asarray(latents, np.float32)

    def _check(
        self,
        prompts: list[str],
        negatives: list[str],
        steps: int,
        height: int,
        width: int,
        output_type: str,
    ) -> None:
        if len(negatives) != len(prompts):
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
