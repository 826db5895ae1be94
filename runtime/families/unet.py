"""SD 1.x / 2.x / XL and their variants: CLIP hidden states joined on the feature axis, SDXL's
pooled embedding and size conditioning, LCM's guidance embedding, classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arguments import GenerationArgs
from ..lora_pool import Hold
from ..tokenizer import ClipTokenizer
from .base import Family, encode, prompt_rows, split_rows, text_lora_rows, with_lora_rows

if TYPE_CHECKING:
    from ..bundle import Bundle
    from ..pipeline import Pipeline


class UNet(Family):
    denoiser = "unet"

    def tokenizers(self, bundle: Bundle) -> dict[str, Any]:
        folders = bundle.tokenizer_dirs()
        return {name: ClipTokenizer.from_dir(path) for name, path in folders.items()}

    def guided(self, pipe: Pipeline, args: GenerationArgs) -> bool:
        return args.guidance_scale > 1.0 and not pipe.guidance_embedded

    def conditionings(
        self, pipe: Pipeline, requests: Sequence[GenerationArgs], holds: Sequence[Hold]
    ) -> list[dict[str, np.ndarray]]:
        plans = [self._rows(pipe, args) for args in requests]
        counts = [len(texts) for texts, _ in plans]
        text = self.encode_text(
            pipe, [text for texts, _ in plans for text in texts], text_lora_rows(holds, counts)
        )
        parts = split_rows(text, counts)
        return [
            with_lora_rows(pipe, _conditioning(pipe, args, part, zeros), hold)
            for args, hold, (_, zeros), part in zip(requests, holds, plans, parts, strict=True)
        ]

    def encode_text(
        self,
        pipe: Pipeline,
        prompts: list[str],
        lora_rows: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Hidden states of every text encoder joined on the feature axis, and SDXL's pooled
        embedding (the last encoder's) as `text_embeds`; `lora_rows` as `encode` takes them."""
        hidden, pooled = [], None
        for name in pipe.tokenizers:
            out = encode(pipe, name, prompts, pipe.manifest["text_max_length"], lora_rows)
            hidden.append(out["text_embeddings"])
            pooled = out.get("pooled_embeddings", pooled)
        text = {"encoder_hidden_states": np.concatenate(hidden, axis=-1)}
        return text if pooled is None else text | {"text_embeds": pooled}

    def _rows(self, pipe: Pipeline, args: GenerationArgs) -> tuple[list[str], bool]:
        """The texts to encode, and whether the negative rows are zeros instead (`negatives`
        None means the model's own choice: SDXL zeros, others "")."""
        guided = self.guided(pipe, args)
        zeros = (
            guided and args.negatives is None and pipe.manifest.get("zero_negative_prompt", False)
        )
        return prompt_rows(args, guided and not zeros), zeros


def _conditioning(
    pipe: Pipeline, args: GenerationArgs, text: dict[str, np.ndarray], zeros: bool
) -> dict[str, np.ndarray]:
    if zeros:
        text = {k: np.concatenate([np.zeros_like(v), v]) for k, v in text.items()}
    cond = {"encoder_hidden_states": text["encoder_hidden_states"]}
    unet_inputs = pipe.denoiser.inputs
    pooled = text.get("text_embeds")
    if "text_embeds" in unet_inputs and pooled is not None:
        # SDXL micro-conditioning: original size, crop top-left, target size
        height, width = args.height, args.width
        cond["text_embeds"] = pooled
        cond["time_ids"] = np.tile(
            np.array([[height, width, 0, 0, height, width]], np.float32), (len(pooled), 1)
        )
    if "timestep_cond" in unet_inputs:
        cond["timestep_cond"] = guidance_embedding(
            np.full(len(args.prompts), args.guidance_scale - 1.0, np.float32),
            unet_inputs["timestep_cond"][1][-1],
        )
    return cond


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of the guidance scale that guidance-distilled U-Nets take."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -(np.log(10000.0) / (half - 1)))
    angles = (w.astype(np.float32) * 1000.0)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)
