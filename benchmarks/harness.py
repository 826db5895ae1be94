"""Timing shared by every benchmark path: the same warm-up, repetitions and percentiles, so a
difference between two rows comes from what ran, never from how it was measured.

A path is a *runner* (Polygraphy's term): calls for each stage, a whole generation and a device
sync. The harness knows nothing about PyTorch or engines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .memory import MemoryProbe

PERCENTILES = (50, 90, 99)
STAGES = ("text_encoder", "unet_step", "vae_decode")
# The pipeline's own per-call timings that are spent inside engines; the rest is the numpy loop.
ENGINE_TIMINGS = ("text_encoder_ms", "unet_ms", "vae_decode_ms")


@dataclass(frozen=True)
class Generated:
    images: np.ndarray  # float32 NHWC in [0, 1]
    timings: dict[str, float] | None  # the path's own per-stage milliseconds, if it keeps them


class Runner(Protocol):
    """One way of producing images, measured by `measure_path`."""

    memory: MemoryProbe

    def stage(self, name: str) -> Callable[[], Any]:
        """One call of stage `name` (one of STAGES) on the workload's stage inputs."""
        ...

    def generate(self, batch: int) -> Generated:
        """The whole pipeline on the workload's latents for `batch` images."""
        ...

    def synchronize(self) -> None:
        """Block until the device has finished all queued work."""
        ...


@dataclass(frozen=True)
class Plan:
    warmup: int
    iterations: int
    batch_sizes: tuple[int, ...]


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays free for the summary."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    values = np.percentile(np.asarray(samples_ms, dtype=np.float64), PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)}


def time_calls(
    call: Callable[[], Any], synchronize: Callable[[], None], warmup: int, iterations: int
) -> tuple[list[float], list[Any]]:
    """Milliseconds and return value of each of `iterations` calls after `warmup` untimed ones.

    The device is drained before and after every timed call, so asynchronously queued work is
    charged to the call that queued it.
    """
    for _ in range(warmup):
        call()
    synchronize()
    samples, results = [], []
    for _ in range(iterations):
        start = time.perf_counter()
        results.append(call())
        synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples, results


def timed_once(call: Callable[[], Any], synchronize: Callable[[], None]) -> tuple[float, Any]:
    """Milliseconds and result of one synchronised call (first calls include lazy setup)."""
    synchronize()
    start = time.perf_counter()
    result = call()
    synchronize()
    return (time.perf_counter() - start) * 1e3, result


def loop_overhead(timings: Sequence[dict[str, float]]) -> dict[str, float] | None:
    """Median time outside the engines (numpy scheduler, guidance, tokenizer, copies) per call,
    in ms and as a percentage of the whole call; None for paths that keep no timings."""
    if not timings or any(t is None for t in timings):
        return None
    outside = [t["total_ms"] - sum(t.get(k, 0.0) for k in ENGINE_TIMINGS) for t in timings]
    totals = [t["total_ms"] for t in timings]
    return {
        "ms": float(np.median(outside)),
        "percent": float(np.median([100 * o / t for o, t in zip(outside, totals, strict=True)])),
    }


def measure_path(
    runner: Runner, plan: Plan, report: Callable[[str], None] = log
) -> tuple[dict[str, Any], np.ndarray]:
    """Stage and end-to-end percentiles, images/s per batch size, peak memory and the loop
    overhead of one path; also returns its batch-1 images, for comparison with eager."""
    runner.memory.start()
    first_ms, first = timed_once(lambda: runner.generate(1), runner.synchronize)
    report(f"  first call (batch 1) {first_ms:.1f} ms")
    runner.memory.sample()
    stages = {}
    for name in STAGES:
        call = _discarding(runner.stage(name))
        samples, _ = time_calls(call, runner.synchronize, plan.warmup, plan.iterations)
        stages[name] = percentiles(samples)
        runner.memory.sample()
        report(f"  {name:13s} {_summary(stages[name])}")
    throughput, overhead = [], None
    for batch in plan.batch_sizes:
        samples, timings = time_calls(
            lambda batch=batch: runner.generate(batch).timings,
            runner.synchronize,
            plan.warmup,
            plan.iterations,
        )
        runner.memory.sample()
        figures = percentiles(samples)
        throughput.append(
            {
                "batch_size": batch,
                "end_to_end_ms": figures,
                "images_per_s": batch * 1e3 / figures["p50"],
            }
        )
        if batch == 1:
            overhead = loop_overhead(timings)
        report(f"  batch {batch:<3d} end to end {_summary(figures)}")
    result = {
        "first_call_ms": first_ms,
        "stages_ms": stages,
        "end_to_end_ms": throughput[plan.batch_sizes.index(1)]["end_to_end_ms"],
        "throughput": throughput,
        "memory": runner.memory.result(),
        "loop_overhead": overhead,
    }
    return result, first.images


def _discarding(call: Callable[[], Any]) -> Callable[[], None]:
    """Drop a stage's outputs at once: kept alive, they would hold device memory and, under
    CUDA graphs, pin the buffers the next replay needs."""

    def run() -> None:
        call()

    return run


def _summary(figures: dict[str, float]) -> str:
    return " / ".join(f"{figures[f'p{p}']:.2f}" for p in PERCENTILES) + " ms (p50/p90/p99)"
