"""Flux.1: CLIP-L's pooled embedding and T5's tokens; latents packed 2x2 into tokens at the
denoiser's edge, with RoPE position ids for image and text tokens; dev's guidance scale is a
per-row input (no classifier-free rows); the schedule's sigmas and dynamic shift as diffusers'
FluxPipeline sets them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arguments import GenerationArgs
from ..schedulers.flow_match import dynamic_shift_mu, flux_sigmas
from .base import Layout, encode, split_rows, text_lora_rows, with_lora_rows
from .flow import FlowTransformer

if TYPE_CHECKING:
    from ..lora_pool import Hold
    from ..pipeline import Pipeline


class Flux(FlowTransformer):
    t5_encoder = "text_encoder_2"
    classifier_free = False

    def guided(self, pipe: Pipeline, args: GenerationArgs) -> bool:
        return False  # dev embeds the scale; schnell has none

    def conditionings(
        self, pipe: Pipeline, requests: Sequence[GenerationArgs], holds: Sequence[Hold]
    ) -> list[dict[str, np.ndarray]]:
        counts = [len(args.prompts) for args in requests]
        prompts = [text for args in requests for text in args.prompts]
        text = self.encode_text(pipe, prompts, text_lora_rows(holds, counts))
        conds = split_rows(text, counts)
        if "guidance" in pipe.denoiser.inputs:  # dev
            for cond, args in zip(conds, requests, strict=True):
                cond["guidance"] = np.full(len(args.prompts), args.guidance_scale, np.float32)
        return [with_lora_rows(pipe, cond, hold) for cond, hold in zip(conds, holds, strict=True)]

    def encode_text(
        self,
        pipe: Pipeline,
        prompts: list[str],
        lora_rows: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        clip = encode(pipe, "text_encoder", prompts, pipe.manifest["text_max_length"], lora_rows)
        t5 = encode(pipe, "text_encoder_2", prompts, pipe.manifest["t5_max_length"], lora_rows)
        return {
            "encoder_hidden_states": t5["text_embeddings"],
            "pooled_projections": clip["pooled_embeddings"],
        }

    def timestep_options(self, manifest: dict[str, Any], args: GenerationArgs) -> dict[str, Any]:
        tokens = _tokens(manifest, args.height, args.width)
        config = manifest["scheduler_config"]
        return {
            "sigmas": flux_sigmas(args.num_inference_steps),
            "mu": dynamic_shift_mu(tokens[0] * tokens[1], config),
        }

    def layout(self, manifest: dict[str, Any], args: GenerationArgs) -> Layout:
        rows, cols = _tokens(manifest, args.height, args.width)
        constants = {
            "img_ids": image_ids(rows, cols),
            "txt_ids": np.zeros((manifest["t5_max_length"], 3), np.float32),
        }
        return Packed2x2(constants, rows, cols)


def _tokens(manifest: dict[str, Any], height: int, width: int) -> tuple[int, int]:
    """The packed token grid of an image: one token per 2x2 latent patch."""
    scale = manifest["vae_scale_factor"] * 2
    return height // scale, width // scale


def image_ids(rows: int, cols: int) -> np.ndarray:
    """RoPE position ids of the image tokens, row-major: (0, row, column) each."""
    ids = np.zeros((rows, cols, 3), np.float32)
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(cols, dtype=np.float32)[None, :]
    return ids.reshape(rows * cols, 3)


@dataclass(frozen=True)
class Packed2x2(Layout):
    """[B, C, h, w] <-> [B, (h/2)(w/2), 4C]: each 2x2 latent patch is one token whose features
    run channel-major over the patch, as diffusers' `_pack_latents` orders them."""

    rows: int = 0  # token grid: h/2 x w/2
    cols: int = 0

    def to_model(self, latents: np.ndarray) -> np.ndarray:
        b, c, h, w = latents.shape
        patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, (h // 2) * (w // 2), c * 4)

    def from_model(self, prediction: np.ndarray) -> np.ndarray:
        b, _, features = prediction.shape
        c, rows, cols = features // 4, self.rows, self.cols
        patches = prediction.reshape(b, rows, cols, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
        return patches.reshape(b, c, rows * 2, cols * 2)
