"""The interface every family implements, and the pieces most of them share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arguments import GenerationArgs
from ..image_inputs import strength_start
from ..lora_pool import INDEX, NO_ADAPTER, Hold, stack_rows

if TYPE_CHECKING:
    from ..bundle import Bundle
    from ..pipeline import Pipeline


@dataclass(frozen=True)
class Layout:
    """How latents [B, C, h, w] enter and leave the denoiser; the identity for U-Nets and
    SD3. `constants` are feeds fixed for one latent size (Flux's position ids), not per row."""

    constants: dict[str, np.ndarray] = field(default_factory=dict)

    def to_model(self, latents: np.ndarray) -> np.ndarray:
        return latents

    def from_model(self, prediction: np.ndarray) -> np.ndarray:
        return prediction


class Family:
    """Defaults are the U-Net's where a family may share them."""

    denoiser = "unet"  # the component the loop calls each step
    classifier_free = True  # guidance can double the denoiser's rows (TensorRT profiles)

    def tokenizers(self, bundle: Bundle) -> dict[str, Any]:
        """Text encoder name -> its tokenizer, in the order the encoders run."""
        raise NotImplementedError

    def guided(self, pipe: Pipeline, args: GenerationArgs) -> bool:
        """Classifier-free guidance: two denoiser rows per image."""
        return args.guidance_scale > 1.0

    def encode_text(
        self,
        pipe: Pipeline,
        prompts: list[str],
        lora_rows: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The denoiser's text conditioning, one row per prompt, each text encoder called
        once (what `conditionings` builds on; build-time fp16 calibration uses it too);
        `lora_rows` as `encode` takes them."""
        raise NotImplementedError

    def conditionings(
        self, pipe: Pipeline, requests: Sequence[GenerationArgs], holds: Sequence[Hold]
    ) -> list[dict[str, np.ndarray]]:
        """Each request's per-row denoiser inputs that stay fixed over its loop (uncond rows
        first); the prompts of all requests go through each text encoder in one call.
        `holds`: each request's run-time adapters (NO_ADAPTER for none)."""
        raise NotImplementedError

    def timestep_options(self, manifest: dict[str, Any], args: GenerationArgs) -> dict[str, Any]:
        """Keywords for the scheduler's `set_timesteps` beside the step count."""
        return {}

    def first_step(self, num_inference_steps: int, strength: float) -> int:
        """img2img: the index of the first step to run."""
        return strength_start(num_inference_steps, strength)

    def layout(self, manifest: dict[str, Any], args: GenerationArgs) -> Layout:
        return Layout()


def prompt_rows(args: GenerationArgs, guided: bool) -> list[str]:
    """The texts to encode for a request: negatives ("" where absent) then prompts when
    guided, the prompts alone otherwise."""
    negatives = args.negatives or [""] * len(args.prompts)
    return negatives + args.prompts if guided else args.prompts


def text_lora_rows(holds: Sequence[Hold], counts: Sequence[int]) -> dict[str, np.ndarray]:
    """The text encoders' branch inputs for the prompts of several requests in one call:
    `counts[i]` prompt rows with request i's adapters."""
    rows = [hold.rows(count) for hold, count in zip(holds, counts, strict=True)]
    return {name: stack_rows([part[name] for part in rows]) for name in rows[0]}


def with_lora_rows(pipe: Pipeline, cond: dict[str, np.ndarray], hold: Hold) -> dict[str, Any]:
    """A request's denoiser conditioning plus its adapters' per-row branch inputs, for a
    bundle exported with --lora-rank (unchanged otherwise)."""
    if INDEX not in pipe.denoiser.inputs:
        return cond
    return cond | hold.rows(len(cond["encoder_hidden_states"]))


def split_rows(arrays: dict[str, np.ndarray], counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut arrays stacked over every request's rows back into one dict per request."""
    found, start = [], 0
    for count in counts:
        found.append({k: v[start : start + count] for k, v in arrays.items()})
        start += count
    return found


def encode(
    pipe: Pipeline,
    name: str,
    prompts: list[str],
    max_length: int,
    lora_rows: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """One text encoder's outputs for `prompts`; `lora_rows`: each prompt's adapter columns,
    for an encoder exported with the run-time LoRA branch (none: no adapter)."""
    engine = pipe.engines[name]
    feeds = {"input_ids": pipe.tokenizers[name].encode(prompts, max_length)}
    if INDEX in engine.inputs:
        feeds |= lora_rows or NO_ADAPTER.rows(len(prompts))
    return engine.run(feeds)
