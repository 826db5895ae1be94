"""What an HTTP server allows and how it shuts down; the batching knobs live on the Batcher."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import Limits


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None  # None: no Authorization header needed
    max_body_bytes: int = 25 * 2**20
    max_image_pixels: int = 4096 * 4096  # uploads above this are refused before decoding
    limits: Limits = field(
        default_factory=lambda: Limits(max_steps=150, max_images=4, max_side=2048)
    )
    drain_deadline_s: float = 30.0  # on SIGTERM: how long in-flight requests may still run
    warmup: bool = True  # one 1-step request per model before /ready says yes
    image_url_ttl_s: float = 3600.0  # how long a response_format "url" image stays served
    image_store_bytes: int = 256 * 2**20  # memory for those images; the oldest go first
    max_partial_images: int = 3  # streamed previews per request (OpenAI allows up to 3)
    lora_dir: Path | None = None  # LoRA files loaded at start and by POST /v1/loras
