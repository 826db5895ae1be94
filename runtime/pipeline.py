"""The denoising loop: prompt -> token ids -> embeddings -> latents -> image.

Mirrors diffusers' StableDiffusionPipeline call so that, given the same latents, the two produce
the same image; every model call goes through an Engine, everything else is numpy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .arguments import DEFAULT_STEPS, GenerationArgs, Limits, check_arguments
from .backends import PARALLEL_LOAD, Engine, check_backend_options, load_engine
from .backends.base import parse_device, upload_constants
from .bundle import Bundle, HashCheck
from .denoise import Timer, start_request, step
from .errors import UserError
from .families import family_for
from .image_inputs import sample_latents
from .images import decoded_to_numpy, numpy_to_pil
from .lora_pool import DEFAULT_MAX_LORAS, NO_ADAPTER, AdapterPool, Hold


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, or float32 NHWC array in [0, 1] for output_type="np"
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage


class Pipeline:
    def __init__(self, bundle: Bundle, engines: dict[str, Engine], tokenizers: dict[str, Any]):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.family = family_for(bundle.manifest)
        self.engines = engines
        self.tokenizers = tokenizers  # text encoder name -> its tokenizer (CLIP or T5)
        # milliseconds `load` spent (see `load`)
        self.load_timings: dict[str, float] = {}
        self.limits = Limits()  # request bounds; replace to raise them
        # run-time LoRAs, for bundles exported with --lora-rank (`load_lora`)
        self.adapters: AdapterPool | None = None

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        backend: str = "onnxruntime",
        device: str = "auto",
        verify: bool = True,
        trusted_key: str | Path | None = None,
        max_loras: int = DEFAULT_MAX_LORAS,
        **backend_options: Any,
    ) -> Pipeline:
        """Validate the bundle and load each engine once; reuse the Pipeline across requests.

        With `trusted_key` (a PEM public key) the bundle must carry a valid signature by its
        private key (`sdrt sign`); unsigned or altered bundles are refused before loading, and
        so are run-time LoRA files (`load_lora`) without a valid FILE.sig by that key.
        `backend_options` go to every engine (e.g. onnxruntime's graph_cache=DIR and threads=N,
        tensorrt's cuda_graph=True).

        The sha256 checks run in threads while the engines load (ONNX Runtime's in parallel,
        one thread each); a file that fails its check fails the load before it returns, so no
        image is ever made from it. `load_timings` (ms): "bundle" (manifest, paths, graph
        references), "verify" (the hash checks, overlapped), one per component (its engine),
        "total" (this call).
        """
        parse_device(device)  # a typo is refused before anything loads, for every backend
        check_backend_options(backend, backend_options)
        start = time.perf_counter()
        loaded, checks = Bundle.open(bundle, trusted_key=trusted_key)
        timings = {"bundle": _ms_since(start)}
        workers = 1 + len(loaded.components)  # the hash checks, and each engine
        with ThreadPoolExecutor(workers, thread_name_prefix="sdrt-load") as pool:
            verifying = pool.submit(_timed, _verify, checks if verify else [])
            engine_pool = pool if backend in PARALLEL_LOAD else None
            loading = {
                name: _submit(
                    engine_pool, _timed, load_engine, backend, loaded, name, device,
                    **backend_options,
                )
                for name in loaded.components
            }  # fmt: skip
            _, timings["verify"] = verifying.result()  # a bad file is the first thing to report
            engines = {}
            for name, future in loading.items():
                engines[name], timings[name] = future.result()
        pipe = cls(loaded, engines, family_for(loaded.manifest).tokenizers(loaded))
        if "lora_branch" in pipe.manifest:  # bundles exported with --lora-rank
            pipe.adapters = AdapterPool(
                pipe.manifest["lora_branch"], engines, max_loras, trusted_key
            )
        timings["total"] = _ms_since(start)
        pipe.load_timings = timings
        return pipe

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
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
        loras: dict[str, float] | None = None,
    ) -> PipelineOutput:
        """txt2img; img2img with `image` (+ `strength`); inpainting with `image` + `mask_image`.

        `latents` is the initial noise (B, C, H/8, W/8); without it, `seed` draws it. `loras`
        {name: scale} applies adapters loaded with `load_lora` (several stack).
        """
        args = self.arguments(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            scheduler=scheduler,
            seed=seed,
            latents=latents,
            image=image,
            mask_image=mask_image,
            strength=strength,
            output_type=output_type,
            loras=loras,
        )
        hold = self.hold_loras(args)
        try:
            return self._generate(args, hold, progress)
        finally:
            hold.release()

    def _generate(self, args: GenerationArgs, hold: Hold, progress: bool) -> PipelineOutput:
        timer, start = Timer(), time.perf_counter()
        denoiser = self.denoiser
        (cond,) = self.conditionings([args], [hold])
        tick = timer("text_encoder_ms", start)
        state = start_request(self, args, cond, self.guided(args))
        # once per request, not per step
        state.cond_device = upload_constants(denoiser, {**cond, **state.layout.constants})
        tick = timer("vae_encode_ms" if args.image is not None else "scheduler_ms", tick)
        for _ in _progress(len(state.timesteps), progress):
            step(denoiser, [state], timer)
        tick = time.perf_counter()
        images = self.decode_latents(state.latents)
        tick = timer("vae_decode_ms", tick)
        timer.ms["unet_step_ms"] = timer.ms.get("unet_ms", 0.0) / max(len(state.timesteps), 1)
        timer.ms["total_ms"] = (tick - start) * 1e3
        pil = args.output_type == "pil"
        return PipelineOutput(numpy_to_pil(images) if pil else images, timer.ms)

    def load_lora(self, name: str, path: str | Path) -> dict[str, Any]:
        """Load LoRA file `path` (diffusers/peft or kohya safetensors) as adapter `name`, for
        requests' `loras={name: scale}`; returns what was loaded (file, rank, layers, bytes).
        When `max_loras` are loaded, the least recently used one no request holds is evicted."""
        return self._adapter_pool().load(name, path)

    def unload_lora(self, name: str) -> None:
        self._adapter_pool().unload(name)

    def loras(self) -> list[dict[str, Any]]:
        """The loaded adapters, least recently used first."""
        pool = self._adapter_pool()
        return [pool.describe(name) for name in pool.names()]

    def hold_loras(self, args: GenerationArgs) -> Hold:
        """The request's adapters, kept loaded until the hold is released (every request of a
        --lora-rank bundle takes its branch inputs from one, adapters or not)."""
        return self._adapter_pool().hold(args.loras) if args.loras else NO_ADAPTER

    def _adapter_pool(self) -> AdapterPool:
        if self.adapters is None:
            raise UserError(
                "this bundle has no run-time LoRA branch; re-export it with --lora-rank R"
            )
        return self.adapters

    @property
    def graph_cache_status(self) -> dict[str, dict[str, str]]:
        """Per component, how ONNX Runtime got each graph loaded so far: "hit", "stored",
        "rebuilt", "off" or "failed" (see `sdrt.graph_cache`); empty for other backends."""
        return {n: dict(getattr(e, "graph_cache_status", {})) for n, e in self.engines.items()}

    def arguments(self, **call: Any) -> GenerationArgs:
        """A request checked against this bundle (`check_arguments` takes the keywords)."""
        return check_arguments(self.manifest, self.engines, **{"limits": self.limits, **call})

    @property
    def denoiser(self) -> Engine:
        """The engine each step calls: the U-Net or the transformer."""
        return self.engines[self.family.denoiser]

    def guided(self, args: GenerationArgs) -> bool:
        """Classifier-free guidance runs two denoiser rows per image."""
        return self.family.guided(self, args)

    @property
    def inpainting_unet(self) -> bool:
        """9-channel U-Nets take the mask and masked-image latents beside the latents."""
        return self.manifest.get("unet_in_channels", 4) > self.manifest["latent_channels"]

    @property
    def guidance_embedded(self) -> bool:
        """Guidance-distilled denoisers (LCM, Flux-dev) take the scale as an input instead of
        a 2x batch."""
        inputs = self.denoiser.inputs
        return "timestep_cond" in inputs or "guidance" in inputs

    def conditionings(
        self, requests: Sequence[GenerationArgs], holds: Sequence[Hold] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Each request's denoiser inputs that stay fixed over its loop, uncond rows first; the
        prompts of all requests go through each text encoder in one call. `holds`: each
        request's adapters (`hold_loras`), for a --lora-rank bundle."""
        holds = holds or [NO_ADAPTER] * len(requests)
        return self.family.conditionings(self, requests, holds)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        scaled = latents / np.float32(self.manifest["vae_scaling_factor"])
        if self.manifest.get("vae_shift_factor") is not None:
            scaled = scaled + np.float32(self.manifest["vae_shift_factor"])
        decoded = self.engines["vae_decoder"].run({"latent": scaled})["image"]
        return decoded_to_numpy(decoded)

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


def _verify(checks: Sequence[HashCheck]) -> None:
    """Run the hash checks on as many threads as there are cores, largest file first: one
    thread alone is what a load with a cached graph waits for (4.1 GB at ~1.3 GB/s)."""
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="sdrt-verify") as pool:
        for _ in pool.map(HashCheck.run, checks):  # the first failure, in the checks' order
            pass


def _timed(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """call(*args, **kwargs) and the milliseconds it took."""
    start = time.perf_counter()
    return call(*args, **kwargs), _ms_since(start)


def _ms_since(start: float) -> float:
    return 1000 * (time.perf_counter() - start)


def _submit(
    pool: ThreadPoolExecutor | None, call: Callable[..., Any], *args: Any, **kwargs: Any
) -> Future[Any]:
    """`pool.submit`, or with no pool the call made here (a backend that loads serially)."""
    if pool is not None:
        return pool.submit(call, *args, **kwargs)
    done: Future[Any] = Future()
    try:
        done.set_result(call(*args, **kwargs))
    except Exception as err:  # noqa: BLE001 - re-raised by result(), like a pool's future
        done.set_exception(err)
    return done


def _progress(steps: int, enabled: bool) -> Any:
    if not enabled:
        return range(steps)
    from tqdm import tqdm

    return tqdm(range(steps), desc="denoising", unit="step", leave=False)
