"""What the flow-matching transformer families (SD3, Flux) share: a transformer denoiser, CLIP
and T5 tokenizers, and diffusers' img2img start for flow schedules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..image_inputs import strength_start
from ..t5_tokenizer import T5Tokenizer
from ..tokenizer import ClipTokenizer
from .base import Family

if TYPE_CHECKING:
    from ..bundle import Bundle


class FlowTransformer(Family):
    denoiser = "transformer"
    t5_encoder = "text_encoder_3"  # the encoder that is a T5 (the others are CLIPs)

    def tokenizers(self, bundle: Bundle) -> dict[str, Any]:
        return {
            name: (T5Tokenizer if name == self.t5_encoder else ClipTokenizer).from_dir(path)
            for name, path in bundle.tokenizer_dirs().items()
        }

    def first_step(self, num_inference_steps: int, strength: float) -> int:
        """As diffusers' SD3 and Flux img2img pipelines count it: n - n * strength, rounded
        down (the U-Net pipelines round n * strength down instead)."""
        strength_start(num_inference_steps, strength)  # the same checks as every family's
        return int(max(num_inference_steps - num_inference_steps * strength, 0))
