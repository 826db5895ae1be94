"""Time the runtime's own numpy work per denoising step, with the engines taken out.

The U-Net and VAE decoder are swapped for engines that answer at once with zeros of the right
shape, so what is left is the loop itself: batch doubling, guidance, the scheduler step and
the step noise. That is the host cost a GPU run pays on top of its engines.

    python -m sdrt.benchmarks.loop_overhead BUNDLE [--size 512] [--steps 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from sdrt import Pipeline
from sdrt.schedulers import compatible_schedulers


class InstantEngine:
    """Stands in for an engine: same I/O contract, zero outputs, no compute."""

    def __init__(self, engine: Any, output: str, scale: int = 1, channels: int | None = None):
        self.inputs, self.outputs = engine.inputs, engine.outputs
        self.output, self.scale, self.channels = output, scale, channels
        self.calls = 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        b, c, h, w = next(iter(feeds.values())).shape
        shape = (b, self.channels or c, h * self.scale, w * self.scale)
        return {self.output: np.zeros(shape, np.float32)}


def numpy_us_per_step(
    pipe: Pipeline, unet: InstantEngine, scheduler: str, size: int, steps: int, repeats: int
) -> float:
    """Best-of-`repeats` numpy time per U-Net call of `scheduler`, in microseconds (PNDM and
    Heun make more calls than steps)."""
    best = float("inf")
    for attempt in range(repeats + 1):  # the first run pays imports and allocation
        unet.calls = 0
        timings = pipe(
            "a cat",
            num_inference_steps=steps,
            height=size,
            width=size,
            scheduler=scheduler,
            output_type="np",
        ).timings
        if attempt:
            best = min(best, timings["scheduler_ms"] * 1e3 / unet.calls)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    pipe = Pipeline.load(args.bundle, device="cpu")
    latent_channels = pipe.manifest["latent_channels"]
    unet = InstantEngine(pipe.engines["unet"], "noise_pred", channels=latent_channels)
    pipe.engines["unet"] = unet
    pipe.engines["vae_decoder"] = InstantEngine(
        pipe.engines["vae_decoder"], "image", scale=pipe.manifest["vae_scale_factor"], channels=3
    )
    print("| scheduler | numpy per step (us) |\n|---|---|")
    for name in compatible_schedulers(pipe.manifest["scheduler"]):
        us = numpy_us_per_step(pipe, unet, name, args.size, args.steps, args.repeats)
        print(f"| {name} | {us:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
