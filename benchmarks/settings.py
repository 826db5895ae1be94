"""Turn `sdrt bench` options into one complete, checked set of settings, with the defaults that
depend on the device filled in, before anything slow starts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from sdrt.backends import BACKENDS
from sdrt.errors import UserError
from sdrt.schedulers import SCHEDULERS

# CUDA: the published SD figures' 50 steps; CPU: enough steps to show the loop, quickly.
DEFAULT_STEPS = {"cuda": 50, "cpu": 4}
DEFAULT_DTYPE = {"cuda": "fp16", "cpu": "fp32"}


@dataclass(frozen=True)
class Settings:
    model: str  # what was benchmarked, for people: a path or "random weights: <preset>"
    source: str | None  # model path, None for random weights
    random_weights: str | None
    allow_pickle: bool
    bundle: Path | None  # reuse this bundle instead of exporting one
    device: str
    dtype: str
    steps: int
    height: int | None  # None: the model's native size, filled in once it is loaded
    width: int | None
    scheduler: str
    prompt: str
    negative_prompt: str
    guidance: float
    seed: int
    warmup: int
    iterations: int
    batch_sizes: tuple[int, ...]  # always starts with 1, the batch of the main table
    torch_compile: bool
    ort_fast_path: bool  # export with fused attention, CUDA fusions and a static shape
    backends: tuple[str, ...]
    out: Path
    max_memory: float | None  # GiB for the export's memory check (see --max-memory)


def resolve_settings(args: argparse.Namespace, cuda_available: bool) -> Settings:
    if args.model and args.random_weights:
        raise UserError("give a model path or --random-weights, not both")
    random_weights = None if args.model else (args.random_weights or "tiny")
    device = args.device or ("cuda" if cuda_available else "cpu")
    if device == "cuda" and not cuda_available:
        raise UserError(
            "--device cuda, but PyTorch sees no CUDA device here; "
            "install a CUDA build of torch or use --device cpu"
        )
    if args.ort_fast_path and device != "cuda":
        raise UserError(
            "--ort-fast-path makes a bundle for ONNX Runtime CUDA only; use it with --device cuda"
        )
    steps = DEFAULT_STEPS[device] if args.steps is None else args.steps
    _check_at_least("--steps", steps, 1)
    _check_at_least("--warmup", args.warmup, 0)
    _check_at_least("--iterations", args.iterations, 1)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{name} must be a positive multiple of 8, got {value}")
    if args.scheduler not in SCHEDULERS:
        raise UserError(
            f"unknown scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
        )
    return Settings(
        model=args.model or f"random weights: {random_weights}",
        source=args.model,
        random_weights=random_weights,
        allow_pickle=args.allow_pickle,
        bundle=Path(args.bundle) if args.bundle else None,
        device=device,
        dtype=args.dtype or DEFAULT_DTYPE[device],
        steps=steps,
        height=args.height,
        width=args.width,
        scheduler=args.scheduler,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        guidance=args.guidance,
        seed=args.seed,
        warmup=args.warmup,
        iterations=args.iterations,
        batch_sizes=parse_batch_sizes(args.batch_sizes),
        torch_compile=device == "cuda" if args.torch_compile is None else args.torch_compile,
        ort_fast_path=device == "cuda" if args.ort_fast_path is None else args.ort_fast_path,
        backends=parse_backends(args.backends),
        out=Path(args.out),
        max_memory=args.max_memory,
    )


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """ "1,4,8" -> (1, 4, 8); batch 1 is always measured, since the main table reports it."""
    try:
        sizes = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        sizes = set()
    if not sizes or min(sizes) < 1:
        raise UserError(
            f"--batch-sizes must be positive integers separated by commas, got {text!r}"
        )
    return tuple(sorted(sizes | {1}))


def parse_backends(text: str | None) -> tuple[str, ...]:
    if text is None:
        return tuple(BACKENDS)
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise UserError(
            f"unknown sdrt backend {', '.join(unknown) or repr(text)}; "
            f"choose from {', '.join(BACKENDS)}"
        )
    return names


def _check_at_least(option: str, value: int, least: int) -> None:
    if value < least:
        raise UserError(f"{option} must be at least {least}, got {value}")
