"""The one place where a generation request's arguments are checked and normalized.

`Pipeline.__call__` and the server both call `check_arguments`, so a value refused in one is
refused in the other with the same sentence (`UserError`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .image_inputs import image_size, strength_start
from .lora_files import check_scale
from .schedulers import FLOW_SCHEDULERS, SCHEDULERS, compatible_schedulers, make_scheduler

DEFAULT_MAX_IMAGES = 16
DEFAULT_STEPS = 30
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class Limits:
    """Bounds on top of what the model accepts, checked before anything is allocated; None
    means unbounded. The defaults stop a typo or a tiny PNG with a huge header from asking
    for gigabytes; raise them (`Pipeline.limits`, `--max-images`, `--max-pixels`) when meant."""

    max_steps: int | None = None
    max_images: int | None = DEFAULT_MAX_IMAGES  # prompts (images) per request
    max_side: int | None = None  # pixels, height and width each
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # height x width, of the output and of inputs


@dataclass(frozen=True)
class GenerationArgs:
    """A validated request: every default resolved, every value of the right type and range."""

    prompts: list[str]
    negatives: list[str] | None  # None: the model's own choice for no negative prompt
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: str
    seed: int | None
    latents: np.ndarray | None  # initial noise (B, C, H/8, W/8); None: drawn from `seed`
    image: Any  # img2img / inpainting start picture, or None
    mask_image: Any  # inpainting mask, or None
    strength: float | None  # share of the schedule run from `image`; None without an image
    output_type: str
    loras: dict[str, float] = field(default_factory=dict)  # run-time LoRA name -> scale


def check_arguments(
    manifest: dict[str, Any],
    components: Collection[str],
    prompt: Any,
    negative_prompt: Any = None,
    num_inference_steps: Any = DEFAULT_STEPS,
    guidance_scale: Any = 7.5,
    height: Any = None,
    width: Any = None,
    scheduler: Any = None,
    seed: Any = None,
    latents: Any = None,
    image: Any = None,
    mask_image: Any = None,
    strength: Any = None,
    output_type: Any = "pil",
    loras: Any = None,
    limits: Limits = Limits(),  # noqa: B008 - frozen, never mutated
) -> GenerationArgs:
    """Raise UserError for the first bad value; `components` are the bundle's engine names."""
    prompts = _as_prompt_list(prompt, "prompt")
    negatives = None
    if negative_prompt is not None:
        negatives = _as_prompt_list(negative_prompt, "negative_prompt")
        negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        if len(negatives) != len(prompts):
            raise UserError(
                f"got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                "pass one, or one per prompt"
            )
    if limits.max_images is not None and len(prompts) > limits.max_images:
        raise UserError(
            f"{len(prompts)} images asked for, at most {limits.max_images} per request; "
            "ask for fewer or raise the limit (--max-images)"
        )
    trained = manifest["scheduler_config"].get("num_train_timesteps", 1000)
    _check_steps(num_inference_steps, min(limits.max_steps or trained, trained))
    _check_guidance(guidance_scale)
    for picture, what in ((image, "image"), (mask_image, "mask_image")):
        if picture is not None:
            _check_picture(picture, what, limits.max_pixels)
    default = image_size(image) if image is not None else manifest["default_size"]
    height = default[0] if height is None else height  # a given 0 is refused, not replaced
    width = default[1] if width is None else width
    _check_size(height, width, manifest.get("size_multiple", 8), limits)
    scheduler = manifest["scheduler"] if scheduler is None else scheduler
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    fitting = compatible_schedulers(manifest["scheduler"])
    if scheduler not in fitting:
        kind = "a flow-matching" if scheduler in FLOW_SCHEDULERS else "a noise-predicting"
        raise UserError(
            f"scheduler {scheduler!r} is for {kind} model, not this bundle's; "
            f"choose one of {', '.join(fitting)}"
        )
    _check_steps_for_scheduler(manifest["scheduler_config"], scheduler, num_inference_steps)
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise UserError(f"seed must be an integer or None, got {seed!r}")
    if seed is not None and seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    if output_type not in ("pil", "np"):
        raise UserError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    strength = _check_image_inputs(
        manifest, components, image, mask_image, strength, num_inference_steps
    )
    if latents is not None:
        latents = _check_latents(manifest, latents, len(prompts), height, width)
    return GenerationArgs(
        prompts,
        negatives,
        int(num_inference_steps),
        float(guidance_scale),
        int(height),
        int(width),
        scheduler,
        None if seed is None else int(seed),
        latents,
        image,
        mask_image,
        strength,
        output_type,
        _check_loras(manifest, loras),
    )


def _check_loras(manifest: dict[str, Any], loras: Any) -> dict[str, float]:
    """{name: scale} for a bundle with the run-time LoRA branch; names are checked against
    the loaded adapters when the request is held (`AdapterPool.hold`)."""
    if not loras:
        return {}
    if not isinstance(loras, dict) or not all(isinstance(k, str) for k in loras):
        raise UserError(f"loras must map adapter names to scales, got {loras!r}")
    if "lora_branch" not in manifest:
        raise UserError(
            "this bundle has no run-time LoRA branch; re-export it with --lora-rank R, or fuse "
            "the LoRA at export with --lora"
        )
    return {name: check_scale(scale, f"LoRA {name!r}") for name, scale in loras.items()}


def latent_shape(manifest: dict[str, Any], batch: int, height: int, width: int) -> tuple[int, ...]:
    """The initial noise's shape for `batch` images at height x width pixels."""
    scale = manifest["vae_scale_factor"]
    return (batch, manifest["latent_channels"], height // scale, width // scale)


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
    for text in prompts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate: bytes that were not UTF-8
            raise UserError(
                f"{what} {text!r} is not valid Unicode (character {err.start} stands for a "
                "byte that is not UTF-8); pass UTF-8 text"
            ) from err
    return list(prompts)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_steps(steps: Any, most: int | None) -> None:
    if not _is_integer(steps) or steps < 1:
        raise UserError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if most is not None and steps > most:
        raise UserError(f"num_inference_steps must be at most {most} here, got {steps}")


def _check_guidance(scale: Any) -> None:
    if (
        not isinstance(scale, numbers.Real)
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale < 0
    ):
        raise UserError(f"guidance_scale must be a finite number >= 0, got {scale!r}")


def _check_size(height: Any, width: Any, multiple: int, limits: Limits) -> None:
    for name, value in (("height", height), ("width", width)):
        if not _is_integer(value) or value <= 0 or value % multiple:
            raise UserError(
                f"{name} must be a positive multiple of {multiple} for this model, got {value!r}"
            )
        if limits.max_side is not None and value > limits.max_side:
            raise UserError(f"{name} must be at most {limits.max_side} pixels here, got {value}")
    if limits.max_pixels is not None and height * width > limits.max_pixels:
        raise UserError(
            f"{height}x{width} is {height * width} pixels, above the limit of "
            f"{limits.max_pixels}; ask for a smaller size or raise the limit (--max-pixels)"
        )


def _check_steps_for_scheduler(config: dict[str, Any], scheduler: str, steps: int) -> None:
    """Set the schedule up once: a step count the scheduler cannot spread over its training
    steps (timesteps past the last one, or repeated) is refused instead of crashing mid-run.
    Flow schedules are continuous in sigma: any step count up to the training one fits."""
    if scheduler in FLOW_SCHEDULERS:
        return
    sched = make_scheduler(scheduler, config)
    try:
        sched.set_timesteps(int(steps))
    except ValueError as err:
        raise UserError(f"{scheduler}: {err}") from err
    timesteps = np.asarray(sched.timesteps)
    trained = config.get("num_train_timesteps", 1000)
    if timesteps.max() > trained - 1 or len(np.unique(timesteps)) < steps:
        raise UserError(
            f"num_inference_steps {steps} is more than the {scheduler} scheduler can spread over "
            f"this model's {trained} training steps; use fewer steps"
        )


def _check_picture(picture: Any, what: str, max_pixels: int | None) -> None:
    """A PIL image, or an HWC array of uint8 / uint16 / float in [0, 1]; anything else would
    be guessed at, so it is refused with the conversion to make."""
    if isinstance(picture, (str, bytes)) or hasattr(picture, "__fspath__"):
        raise UserError(
            f"{what} must be a PIL image or an array, got the path {str(picture)!r}; "
            "open it first: PIL.Image.open(path)"
        )
    if isinstance(picture, Image.Image):
        pixels = picture.width * picture.height
    else:
        array = np.asarray(picture)
        _check_picture_array(array, what)
        pixels = array.shape[0] * array.shape[1]
    if max_pixels is not None and pixels > max_pixels:
        raise UserError(
            f"{what} has {pixels} pixels, above the limit of {max_pixels}; pass a smaller "
            "picture or raise the limit (--max-pixels)"
        )


def _check_picture_array(array: np.ndarray, what: str) -> None:
    channels = (1, 3) if what == "mask_image" else (3,)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        raise UserError(
            f"{what} array has shape {array.shape}, channels first (CHW); pass it as "
            "(height, width, channels): array.transpose(1, 2, 0)"
        )
    if not (array.ndim == 2 and what == "mask_image") and not (
        array.ndim == 3 and array.shape[2] in channels
    ):
        raise UserError(
            f"{what} array must be (height, width, {'|'.join(map(str, channels))})"
            f"{' or (height, width)' if what == 'mask_image' else ''}, got shape {array.shape}"
        )
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise UserError(f"{what} array holds NaN or infinite values; pass finite values")
        if array.min() < 0 or array.max() > 1:
            raise UserError(
                f"{what} float array must hold values in [0, 1], got {array.min()}..{array.max()}"
                "; divide 0..255 values by 255 (or pass uint8)"
            )
    elif array.dtype not in (np.uint8, np.uint16):
        raise UserError(
            f"{what} array has dtype {array.dtype}; pass uint8, uint16 or float in [0, 1]"
        )


def _check_image_inputs(
    manifest: dict[str, Any],
    components: Collection[str],
    image: Any,
    mask_image: Any,
    strength: Any,
    steps: int,
) -> float | None:
    """The strength to run from `image` (default 0.8, or 1.0 when inpainting), else None."""
    if mask_image is not None and image is None:
        raise UserError("mask_image needs image: pass the picture to inpaint as well")
    if mask_image is not None and manifest["prediction_type"] == "flow":
        raise UserError(
            f"inpainting is not supported for {manifest['family']} bundles yet; drop mask_image "
            "(img2img with image and strength works)"
        )
    if image is not None and "vae_encoder" not in components:
        raise UserError(
            "this bundle has no vae_encoder, so it cannot do img2img or inpainting; re-export it"
        )
    if manifest.get("unet_in_channels", 4) > manifest["latent_channels"] and mask_image is None:
        raise UserError("this is an inpainting model: pass image and mask_image")
    if image is None:
        if strength is not None:
            raise UserError(
                f"strength {strength!r} needs an image to start from; pass image, or drop strength"
            )
        return None
    if strength is None:
        strength = 1.0 if mask_image is not None else 0.8
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
        raise UserError(f"strength must be in (0, 1], got {strength!r}")
    strength_start(steps, float(strength))  # raises when no step would run
    if mask_image is not None and image_size(mask_image) != image_size(image):
        raise UserError(
            f"mask_image is {image_size(mask_image)} (height, width) but image is "
            f"{image_size(image)}; pass a mask of the image's size"
        )
    return float(strength)


def _check_latents(
    manifest: dict[str, Any], latents: Any, batch: int, height: int, width: int
) -> np.ndarray:
    shape = latent_shape(manifest, batch, height, width)
    if tuple(np.shape(latents)) != shape:
        raise UserError(
            f"latents have shape {tuple(np.shape(latents))}, expected {shape} for "
            f"{shape[0]} prompt(s) at {shape[2]}x{shape[3]} latents"
        )
    array = np.asarray(latents)
    if array.dtype.kind not in "fiu" or not np.isfinite(array).all():
        raise UserError(
            "latents must be finite numbers (no NaN or infinity); draw them from a normal "
            "distribution, or pass seed instead"
        )
    return array.astype(np.float32)
