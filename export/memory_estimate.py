"""Estimate export's peak RSS before it starts, and refuse an export the machine cannot hold.

Export loads the whole pipeline in fp32, then exports its components one at a time, freeing
each one's PyTorch weights once traced. While a component is traced, the exporter holds more
on top of the weights still loaded: for a graph under 2 GB it builds the whole protobuf in
memory (and copies each weight for it), above 2 GB it writes the weights to files as it goes.
The graph passes (fp16 measure and convert, CUDA fusions) run after the component's PyTorch
weights are freed, with ONNX Runtime reading the weights from files. The factors below were
measured with `python -m sdrt.benchmarks.export_memory` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from sdrt.errors import UserError

from .checkpoint_files import safetensors_header

GIB = 2**30
# interpreter with torch, onnx and ONNX Runtime imported, and the pipeline's non-weight
# memory (measured: a loaded pipeline is 0.44-0.47 GiB above its weights, SD 1.5 and SDXL)
BASE_BYTES = int(0.47 * GIB)
# the order export works in; a component it does not export (a safety checker) stays loaded
EXPORT_ORDER = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "unet",
    "transformer",
    "vae",
)
INLINE_LIMIT = 2**31  # fp32 weights under which the exporter serialises the graph in memory
# extra RSS while a component is traced, in units of its fp32 weights. Under 2 GB: SD 1.5's
# text encoder, 1.49 GiB above the loaded pipeline for 0.46 GiB of weights (3.2).
# Above: SD 1.5's U-Net, at most 0.16 GiB for 3.20 GiB (the sampled peak).
INLINE_FACTOR = 3.3
EXTERNAL_FACTOR = 0.2
# The graph passes for a component whose PyTorch weights are freed hold one copy of its
# weights (mapped by ONNX Runtime) plus working memory at the trace size: measured 5.2 GiB on
# SD 1.5's fused U-Net (fp16 measure 9.13 GiB) and 4.5 GiB on SDXL's (14.83 GiB). Counted
# whole for every component, it overestimates the text encoders' (1.3-1.5 GiB measured):
# SDXL with passes is estimated at 18.6 GiB and measured at 14.8.
PASS_EXTRA_BYTES = int(5.2 * GIB)
# A streamed export (load.streams: a full-size diffusion transformer) holds a segment's weights
# (streamed_export.SEGMENT_BYTES) a few times over while it measures and converts it, and its
# weightless trace some of the model's size: measured peaks 7.19 GiB (sd35-medium), 6.24
# (flux-schnell), 8.51 (sd35-large, in the trace), all fp16 (benchmarks/RESULTS.md).
STREAMED_BYTES = int(8.1 * GIB)
SAFETENSORS_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def pipeline_component_bytes(pipe: Any) -> dict[str, int]:
    """fp32 parameter bytes of each torch module of a pipeline (meta tensors count too)."""
    sizes = {}
    for name, module in pipe.components.items():
        if hasattr(module, "parameters"):
            sizes[name] = 4 * sum(p.numel() for p in module.parameters())
    return sizes


def folder_component_bytes(folder: Path) -> dict[str, int]:
    """fp32 weight bytes of each component of a diffusers folder, read from the safetensors
    headers (no weights are read). A single checkpoint file counts as one component; a pickle
    one (`--allow-pickle`) by its size, since its tensors cannot be counted without
    unpickling it."""
    if folder.is_file() and folder.suffix != ".safetensors":
        return {folder.stem: folder.stat().st_size}
    files = [folder] if folder.is_file() else sorted(folder.glob("*/*.safetensors"))
    sizes: dict[str, int] = {}
    for path in files:
        name = path.stem if folder.is_file() else path.parent.name
        sizes[name] = sizes.get(name, 0) + 4 * safetensors_elements(path)
    return sizes


def safetensors_elements(path: Path) -> int:
    """Number of floating-point elements in a .safetensors file, from its checked header."""
    return sum(
        math.prod(entry["shape"])
        for key, entry in safetensors_header(path).items()
        if key != "__metadata__" and entry["dtype"] in SAFETENSORS_ITEM
    )


def estimate_peak_bytes(component_bytes: dict[str, int], passes: bool = False) -> int:
    """Peak RSS of exporting a pipeline whose components hold `component_bytes` fp32 weights,
    with graph `passes` (--dtype fp16 or --cuda-fusions) or without. A single checkpoint file
    counts as one component."""
    exported = [n for n in EXPORT_ORDER if n in component_bytes]
    if not exported and component_bytes:
        exported = [max(component_bytes, key=lambda n: component_bytes[n])]
    held = sum(component_bytes.values())
    peak = held
    for name in exported:
        size = component_bytes[name]
        factor = INLINE_FACTOR if size < INLINE_LIMIT else EXTERNAL_FACTOR
        peak = max(peak, int(held + factor * size))
        held -= size
        if passes:
            peak = max(peak, held + size + PASS_EXTRA_BYTES)
    return BASE_BYTES + peak


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping; None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def source_component_bytes(source: str | None, random_weights: str | None) -> dict[str, int]:
    """Weight bytes per component of what `sdrt export` is about to load, without loading it:
    a preset built on the meta device, or a folder's / file's safetensors headers."""
    if random_weights is not None:
        from .load import random_pipeline

        return pipeline_component_bytes(random_pipeline(random_weights, device="meta"))
    path = Path(source or "")
    return folder_component_bytes(path) if path.exists() else {}


def check_export_memory(
    max_memory: float | None,
    source: str | None,
    random_weights: str | None,
    passes: bool,
    available: int | None = None,
) -> None:
    """The memory check before an export loads anything (`sdrt export`, `sdrt bench`).

    `max_memory` (GiB) given: refuse in one line above it; 0 turns the check off. Not given:
    never refuse, since some machines (microVMs among them) start with little memory available
    and grow it as it is used, and there even MemTotal is not what they can give; warn in one
    line when the estimate is above what is available now (`available`, default MemAvailable).
    """
    if max_memory is not None and max_memory < 0:
        raise UserError(f"--max-memory {max_memory} is negative; give GiB, or 0 for no check")
    if max_memory == 0:
        return
    from .load import streams

    if streams(source, random_weights):  # weights on disk: bounded by segment, not model
        estimate = BASE_BYTES + STREAMED_BYTES
    else:
        estimate = estimate_peak_bytes(source_component_bytes(source, random_weights), passes)
    if max_memory is not None:
        check_fits(estimate, int(max_memory * GIB))
        return
    now = available_bytes() if available is None else available
    if now is not None and estimate > now:
        warnings.warn(
            f"this export needs about {estimate / GIB:.1f} GiB of RAM and "
            f"{now / GIB:.1f} GiB is available now; going on, as machines that grow their "
            "memory when it is used report little at first (--max-memory GIB refuses instead)",
            RuntimeWarning,
            stacklevel=2,
        )


def check_fits(estimate: int, limit: int) -> None:
    """Refuse in one line when `estimate` exceeds `limit` (bytes)."""
    if estimate > limit:
        raise UserError(
            f"this export needs about {estimate / GIB:.1f} GiB of RAM, above the "
            f"{limit / GIB:.1f} GiB allowed by --max-memory; free memory, raise --max-memory, "
            "or export on a larger machine"
        )
