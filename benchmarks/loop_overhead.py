"""Time the runtime's own numpy work per denoising step, with the engines taken out.

The U-Net and VAE decoder are swapped for engines that answer at once with zeros of the right
shape, so what is left is the loop itself: batch doubling, guidance, the scheduler step and
the step noise. That is the host cost a GPU run pays on top of its engines. Then one request
alone, through `Pipeline` and through the server's `Batcher`: what the batcher's per-tick
bookkeeping adds per step when it has nothing to batch.

    python -m sdrt.benchmarks.loop_overhead BUNDLE [--size 512] [--steps 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
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


class InstantTextEncoder:
    """Stands in for a text encoder: one real answer, its first row repeated per prompt."""

    def __init__(self, engine: Any, ids: np.ndarray):
        self.inputs, self.outputs = engine.inputs, engine.outputs
        self.answer = engine.run({"input_ids": ids[:1]})

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(feeds["input_ids"])
        return {name: np.repeat(value, rows, axis=0) for name, value in self.answer.items()}


def make_instant(pipe: Pipeline) -> InstantEngine:
    """Swap every engine of `pipe` for an instant one; returns the U-Net (it counts calls)."""
    channels = pipe.manifest["latent_channels"]
    unet = InstantEngine(pipe.engines["unet"], "noise_pred", channels=channels)
    pipe.engines["unet"] = unet
    pipe.engines["vae_decoder"] = InstantEngine(
        pipe.engines["vae_decoder"], "image", scale=pipe.manifest["vae_scale_factor"], channels=3
    )
    for name, tokenizer in pipe.tokenizers.items():
        ids = tokenizer.encode(["a cat"], pipe.manifest["text_max_length"])
        pipe.engines[name] = InstantTextEncoder(pipe.engines[name], ids)
    return unet


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


def lone_request_us_per_step(pipe: Pipeline, size: int, steps: int, repeats: int) -> dict:
    """CPU time per step of one request alone (the bundle's first scheduler, ddim for U-Nets),
    through Pipeline and through the serving Batcher, best of `repeats`, on a pipe with
    instant engines (`make_instant`). Process time, not wall time: only one thread works at a
    time here, and other jobs on a shared machine do not count."""
    from sdrt.serve import Batcher

    call = dict(prompt="a cat", num_inference_steps=steps, height=size, width=size)
    call.update(scheduler=compatible_schedulers(pipe.manifest["scheduler"])[0], output_type="np")
    batcher = Batcher(pipe)
    batcher.start()
    paths = {"pipeline": lambda: pipe(**call), "batcher": lambda: batcher.submit(call).result()}
    best = dict.fromkeys(paths, float("inf"))
    for attempt in range(repeats + 1):  # the first round pays first-call costs
        for name, run in paths.items():
            start = time.process_time()
            run()
            if attempt:
                best[name] = min(best[name], (time.process_time() - start) * 1e6 / steps)
    batcher.stop()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    pipe = Pipeline.load(args.bundle, device="cpu")
    unet = make_instant(pipe)
    print("| scheduler | numpy per step (us) |\n|---|---|")
    for name in compatible_schedulers(pipe.manifest["scheduler"]):
        us = numpy_us_per_step(pipe, unet, name, args.size, args.steps, args.repeats)
        print(f"| {name} | {us:.0f} |")
    lone = lone_request_us_per_step(pipe, args.size, args.steps, args.repeats)
    print(
        f"\nOne request alone, CPU per step: Pipeline {lone['pipeline']:.1f} us, "
        f"through the Batcher {lone['batcher']:.1f} us "
        f"(+{lone['batcher'] - lone['pipeline']:.1f} us of batcher bookkeeping)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
