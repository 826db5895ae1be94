"""The denoising loop as per-request state plus one step over any number of requests.

`Pipeline.__call__` steps one request to completion; the server's batcher steps every active
request of one latent size together. Both run `step`, so a request's image does not depend on
what it was batched with: each request keeps its own scheduler, rng, guidance scale and step
index, and only the denoiser call is shared (per-row `timestep` and conditioning). Latents stay
in the VAE layout [B, C, h, w]; the family's `Layout` converts them at the denoiser's edge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .arguments import GenerationArgs, latent_shape
from .families import Layout
from .image_inputs import image_to_pixels, latent_mask, mask_to_array
from .lora_pool import INDEX, SCALE, stack_rows
from .schedulers import make_scheduler, predicted_clean

if TYPE_CHECKING:
    from .pipeline import Pipeline


class Timer:
    """Accumulates wall time per stage name, in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def __call__(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - start) * 1e3
        return now


@dataclass
class ImageStart:
    """Where an img2img or inpainting loop starts, and what it carries along each step."""

    latents: np.ndarray
    unet_extra: np.ndarray | None = None  # mask + masked-image latents for 9-channel U-Nets
    blend_mask: np.ndarray | None = None  # 1 = repaint, for ordinary U-Nets
    image_latents: np.ndarray | None = None


@dataclass
class RequestState:
    """One request between its conditioning and its VAE decode."""

    sched: Any
    rng: np.random.Generator
    latents: np.ndarray  # (B, C, h, w), the current sample
    noise: np.ndarray  # the initial noise, for the inpainting blend
    timesteps: np.ndarray  # the ones this request runs (img2img starts part-way)
    guidance_scale: float
    guided: bool  # classifier-free guidance: two U-Net rows per image
    cond: dict[str, np.ndarray]  # per-row U-Net conditioning as host arrays, uncond rows first
    cond_device: dict[str, Any] | None = None  # `cond` uploaded once, for a lone request
    image_start: ImageStart | None = None
    unet_extra: np.ndarray | None = None  # 9-channel inputs, doubled with guidance
    index: int = 0  # next step to run
    layout: Layout = field(default_factory=Layout)  # how latents enter and leave the denoiser
    preview_at: frozenset[int] = frozenset()  # step counts after which to keep a preview
    preview: np.ndarray | None = None  # the predicted clean latents, until someone takes them

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def rows(self) -> int:
        """Denoiser batch rows this request takes per step."""
        return len(self.latents) * (2 if self.guided else 1)

    def model_input(self) -> np.ndarray:
        scaled = self.sched.scale_model_input(self.latents, self.timesteps[self.index])
        model_in = np.concatenate([scaled] * 2) if self.guided else scaled  # scale once, not twice
        if self.unet_extra is not None:
            model_in = np.concatenate([model_in, self.unet_extra], axis=1)
        return self.layout.to_model(model_in)

    def advance(self, noise_pred: np.ndarray) -> None:
        """Guidance combine and one scheduler step from this request's denoiser rows."""
        noise_pred = self.layout.from_model(noise_pred)
        t = self.timesteps[self.index]
        if self.guided:
            uncond, text = np.split(noise_pred, 2)
            noise_pred = uncond + np.float32(self.guidance_scale) * (text - uncond)
        stochastic = self.sched.stochastic
        step_noise = (
            self.rng.standard_normal(self.latents.shape, np.float32) if stochastic else None
        )
        if self.index + 1 in self.preview_at:  # before the step moves the sample on
            scaled = self.sched.scale_model_input(self.latents, t)
            self.preview = predicted_clean(self.sched.config, scaled, noise_pred, t)
        self.latents = self.sched.step(noise_pred, t, self.latents, noise=step_noise)
        if self.image_start is not None and self.image_start.blend_mask is not None:
            self.latents = _blend_known_region(self)
        self.index += 1


def preview_steps(total: int, count: int) -> frozenset[int]:
    """`count` step counts evenly spaced inside a run of `total` steps (fewer when it is too
    short for them all): where a streamed request's partial images are taken."""
    return frozenset(round(total * j / (count + 1)) for j in range(1, count + 1)) - {0, total}


def start_request(
    pipe: Pipeline, args: GenerationArgs, cond: dict[str, np.ndarray], guided: bool
) -> RequestState:
    """Scheduler, rng and initial latents for one checked request (img2img: encoded image)."""
    family = pipe.family
    sched = make_scheduler(args.scheduler, pipe.manifest["scheduler_config"])
    sched.set_timesteps(args.num_inference_steps, **family.timestep_options(pipe.manifest, args))
    rng = np.random.default_rng(args.seed)
    shape = latent_shape(pipe.manifest, len(args.prompts), args.height, args.width)
    noise = args.latents if args.latents is not None else rng.standard_normal(shape, np.float32)
    state = RequestState(
        sched, rng, noise, noise, sched.timesteps, args.guidance_scale, guided, cond
    )
    state.layout = family.layout(pipe.manifest, args)
    if args.image is None:
        state.latents = noise * np.float32(sched.init_noise_sigma)
        return state
    first = family.first_step(args.num_inference_steps, args.strength)
    begin = _start_from_image(pipe, args, noise, first, sched, rng)
    state.timesteps, state.latents, state.image_start = (
        sched.timesteps[first * sched.order :],
        begin.latents,
        begin,
    )
    extra = begin.unet_extra
    state.unet_extra = np.concatenate([extra] * 2) if extra is not None and guided else extra
    return state


def step(
    denoiser: Any, states: list[RequestState], timer: Timer | None = None, pad_to: int = 0
) -> None:
    """One denoiser call over every state's rows (same latent size, so the same layout
    constants), then each state's own guidance and scheduler step. `pad_to` repeats the last
    row up to a fixed engine batch (static CUDA-graph variants); the padding's output is
    dropped."""
    timer = timer or Timer()
    tick = time.perf_counter()
    inputs = [state.model_input() for state in states]
    times = [
        np.full(len(rows), state.timesteps[state.index], np.float32)
        for rows, state in zip(inputs, states, strict=True)
    ]
    if len(states) == 1 and states[0].cond_device is not None:
        cond = states[0].cond_device
    else:
        cond = {k: _rows([s.cond[k] for s in states], k) for k in states[0].cond}
        cond |= states[0].layout.constants
    feeds = {"sample": _rows(inputs), "timestep": _rows(times), **cond}
    if pad_to > len(feeds["sample"]):
        constants = states[0].layout.constants
        feeds = {k: v if k in constants else _pad(v, pad_to) for k, v in feeds.items()}
    tick = timer("scheduler_ms", tick)
    noise_pred = denoiser.run(feeds)["noise_pred"]
    tick = timer("unet_ms", tick)
    start = 0
    for rows, state in zip(inputs, states, strict=True):
        state.advance(noise_pred[start : start + len(rows)])
        start += len(rows)
    timer("scheduler_ms", tick)


def _rows(parts: list[np.ndarray], name: str = "") -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    # requests' LoRA columns differ in number (their adapters' ranks): padded
    return stack_rows(parts) if name in (INDEX, SCALE) else np.concatenate(parts)


def _pad(rows: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


def _start_from_image(
    pipe: Pipeline,
    args: GenerationArgs,
    noise: np.ndarray,
    first: int,
    sched: Any,
    rng: np.random.Generator,
) -> ImageStart:
    batch = noise.shape[0]
    pixels = image_to_pixels(args.image, args.height, args.width)
    sched.set_begin_index(first * sched.order)
    t_first = sched.timesteps[first * sched.order]
    image_latents = None
    inpainting_unet = pipe.inpainting_unet
    if args.mask_image is None or first > 0 or not inpainting_unet:  # skip an unused encode
        image_latents = np.repeat(pipe.encode_image(pixels, rng), batch, axis=0)
    if args.mask_image is None:
        return ImageStart(sched.add_noise(image_latents, noise, t_first))
    mask = mask_to_array(args.mask_image, args.height, args.width)
    small_mask = np.repeat(latent_mask(mask, pipe.manifest["vae_scale_factor"]), batch, 0)
    if first == 0:  # full strength starts from pure noise, as in diffusers
        latents = noise * np.float32(sched.init_noise_sigma)
    else:
        latents = sched.add_noise(image_latents, noise, t_first)
    if not inpainting_unet:
        return ImageStart(latents, blend_mask=small_mask, image_latents=image_latents)
    masked = np.repeat(pipe.encode_image(pixels * (mask < 0.5), rng), batch, axis=0)
    return ImageStart(latents, unet_extra=np.concatenate([small_mask, masked], axis=1))


def _blend_known_region(state: RequestState) -> np.ndarray:
    """Inpainting with an ordinary U-Net: keep the unmasked region on the image's noisy path."""
    begin, i = state.image_start, state.index
    known = begin.image_latents
    if i < len(state.timesteps) - 1:
        known = state.sched.add_noise(known, state.noise, state.timesteps[i + 1])
    return (1 - begin.blend_mask) * known + begin.blend_mask * state.latents
