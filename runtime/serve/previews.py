"""Streamed partial images: a request's predicted clean latents (x0) at evenly spaced steps,
decoded by the bundle's VAE on the batcher thread right after the step that made them.

The decode runs between ticks, so it holds the other requests' next step up by exactly its own
duration; every request with a preview due in a tick shares one VAE call per latent size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..denoise import RequestState, Timer, preview_steps

log = logging.getLogger("sdrt.serve")


@dataclass
class Previews:
    """What a request wants streamed: `count` partial images, each handed to `deliver` (preview
    number from 0, images float32 NHWC in [0, 1]) on the batcher thread, so it must only hand
    them on (e.g. `loop.call_soon_threadsafe`)."""

    count: int
    deliver: Callable[[int, np.ndarray], None]
    sent: int = 0

    def plan(self, state: RequestState) -> None:
        """Mark the steps of this request's run whose x0 to keep."""
        state.preview_at = preview_steps(len(state.timesteps), self.count)


def send_previews(pipeline: Any, jobs: Sequence[Any], timer: Timer) -> None:
    """Decode and deliver every preview the last step left on `jobs` (batcher Jobs)."""
    due = [job for job in jobs if job.state is not None and job.state.preview is not None]
    by_shape: dict[tuple[int, ...], list[Any]] = {}
    for job in due:
        latents, job.state.preview = job.state.preview, None
        if job.previews is not None and not job.future.done():
            by_shape.setdefault(latents.shape[1:], []).append((job, latents))
    for group in by_shape.values():
        tick = time.perf_counter()
        try:
            images = pipeline.decode_latents(np.concatenate([latents for _, latents in group]))
        except Exception:  # a preview is a courtesy: the request itself goes on
            log.exception("preview decode failed")
            continue
        timer("vae_decode_ms", tick)  # engine time, as the final decode
        start = 0
        for job, latents in group:
            job.previews.deliver(job.previews.sent, images[start : start + len(latents)])
            job.previews.sent += 1
            start += len(latents)
