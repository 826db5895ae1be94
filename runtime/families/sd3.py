"""SD3 / SD3.5: CLIP-L and CLIP-G penultimate states joined on the feature axis, zero-padded
to T5's width and followed by T5's tokens on the sequence; their pooled embeddings joined;
classifier-free guidance with negative prompts; the 16-channel latents as they are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arguments import GenerationArgs
from ..schedulers.flow_match import dynamic_shift_mu
from .base import encode, prompt_rows, split_rows, text_lora_rows, with_lora_rows
from .flow import FlowTransformer

if TYPE_CHECKING:
    from ..lora_pool import Hold
    from ..pipeline import Pipeline


class SD3(FlowTransformer):
    t5_encoder = "text_encoder_3"

    def conditionings(
        self, pipe: Pipeline, requests: Sequence[GenerationArgs], holds: Sequence[Hold]
    ) -> list[dict[str, np.ndarray]]:
        rows = [prompt_rows(args, self.guided(pipe, args)) for args in requests]
        counts = [len(texts) for texts in rows]
        text = self.encode_text(
            pipe, [text for texts in rows for text in texts], text_lora_rows(holds, counts)
        )
        parts = split_rows(text, counts)
        return [with_lora_rows(pipe, part, hold) for part, hold in zip(parts, holds, strict=True)]

    def encode_text(
        self,
        pipe: Pipeline,
        prompts: list[str],
        lora_rows: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        clip_length, t5_length = pipe.manifest["text_max_length"], pipe.manifest["t5_max_length"]
        clip_l = encode(pipe, "text_encoder", prompts, clip_length, lora_rows)
        clip_g = encode(pipe, "text_encoder_2", prompts, clip_length, lora_rows)
        t5 = encode(pipe, "text_encoder_3", prompts, t5_length, lora_rows)["text_embeddings"]
        clip = np.concatenate([clip_l["text_embeddings"], clip_g["text_embeddings"]], axis=-1)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        return {
            "encoder_hidden_states": np.concatenate([clip, t5], axis=1),
            "pooled_projections": np.concatenate(
                [clip_l["pooled_embeddings"], clip_g["pooled_embeddings"]], axis=-1
            ),
        }

    def timestep_options(self, manifest: dict[str, Any], args: GenerationArgs) -> dict[str, Any]:
        """SD3 configs that shift dynamically take `mu` from the image's patch count."""
        config = manifest["scheduler_config"]
        if not config.get("use_dynamic_shifting"):
            return {}
        patch = manifest["vae_scale_factor"] * manifest.get("patch_size", 2)
        return {"mu": dynamic_shift_mu((args.height // patch) * (args.width // patch), config)}
