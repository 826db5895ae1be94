"""How long a streamed preview holds up the other requests: `python -m sdrt.benchmarks.preview_cost
BUNDLE [--size 64] [--steps 40] [--repeats 3]`.

Two requests share every U-Net call of a Batcher; one streams 3 previews. Each U-Net call and
each decode (VAE call plus conversion to pixels) is timed where it runs, so the gap between
two U-Net calls that had a preview decoded in it can be set against the gaps that had none:
the hold-up, to compare with the decode's own duration.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from sdrt import Pipeline
from sdrt.serve import Batcher
from sdrt.serve.previews import Previews


class Timed:
    """An engine whose `run` calls are recorded as (start, end) perf_counter pairs."""

    def __init__(self, engine: Any, calls: list[tuple[float, float]]) -> None:
        self.engine, self.calls = engine, calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, feeds: dict) -> dict:
        start = time.perf_counter()
        out = self.engine.run(feeds)
        self.calls.append((start, time.perf_counter()))
        return out


def measure(bundle: str, size: int, steps: int, repeats: int) -> dict[str, float]:
    pipe = Pipeline.load(bundle, device="cpu")
    unet_calls: list[tuple[float, float]] = []
    decodes: list[tuple[float, float]] = []
    pipe.engines["unet"] = Timed(pipe.engines["unet"], unet_calls)
    decode = pipe.decode_latents

    def timed_decode(latents: Any) -> Any:  # the VAE call and its conversion to pixels
        start = time.perf_counter()
        images = decode(latents)
        decodes.append((start, time.perf_counter()))
        return images

    pipe.decode_latents = timed_decode  # type: ignore[method-assign]
    batcher = Batcher(pipe)
    batcher.start()
    call = {"prompt": "a", "height": size, "width": size, "scheduler": "ddim"}
    call |= {"num_inference_steps": steps, "output_type": "np"}
    batcher.submit({**call, "num_inference_steps": 2}).result()  # warm-up
    held, free, decode_ms = [], [], []
    for repeat in range(repeats):
        unet_calls.clear()
        decodes.clear()
        other = batcher.submit({**call, "seed": repeat})
        streamed = batcher.submit(pipe.arguments(**call, seed=99), Previews(3, lambda i, x: None))
        other.result()
        streamed.result()
        for (_, end), (start, _) in zip(unet_calls, unet_calls[1:], strict=False):
            inside = [d for d in decodes if end <= d[0] and d[1] <= start]
            (held if inside else free).append((start - end) * 1e3)
            decode_ms += [(d[1] - d[0]) * 1e3 for d in inside]
    batcher.stop()
    return {
        "gap_with_preview_ms": statistics.median(held),
        "gap_without_ms": statistics.median(free),
        "preview_decode_ms": statistics.median(decode_ms),
        "previews": len(decode_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures = measure(args.bundle, args.size, args.steps, args.repeats)
    hold_up = figures["gap_with_preview_ms"] - figures["gap_without_ms"]
    print(
        f"{args.size}x{args.size}, {figures['previews']} previews: the gap between two U-Net "
        f"calls is {figures['gap_without_ms']:.2f} ms without a preview and "
        f"{figures['gap_with_preview_ms']:.2f} ms with one (hold-up {hold_up:.2f} ms); "
        f"the decode alone takes {figures['preview_decode_ms']:.2f} ms (medians)"
    )


if __name__ == "__main__":
    main()
