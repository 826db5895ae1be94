"""Estimate export's peak RSS before it starts, and refuse an export the machine cannot hold.

Export holds the whole pipeline in fp32 and, while one component is exported, some multiple of
that component's weights on top (exporter, graph passes, ONNX Runtime session). The multiples
below were measured with `python -m sdrt.benchmarks.export_memory` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from sdrt.errors import UserError

GIB = 2**30
# interpreter with torch, onnx and ONNX Runtime imported (measured: 0.23 GiB)
BASE_BYTES = GIB // 4
# peak above the loaded pipeline, in units of the largest component's fp32 weights:
# (dtype, cuda_fusions) -> factor. fp32: SD 1.5 measured 0.52 (5.90 GiB peak; weights 3.97 GiB,
# U-Net 3.20 GiB). fp16 and the fusions load the whole graph for their passes: 4.3 measured
# before the streaming changes (SD 1.5 fp16 fused-attention static, 19.3 GB), past 5.7 with
# --cuda-fusions (beyond 24 GB); not measured since, so kept as upper bounds.
EXTRA_FACTOR = {
    ("fp32", False): 0.6,
    ("fp32", True): 6.0,
    ("fp16", False): 4.5,
    ("fp16", True): 6.0,
}
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
    headers (no weights are read). A single .safetensors file counts as one component."""
    files = [folder] if folder.is_file() else sorted(folder.glob("*/*.safetensors"))
    sizes: dict[str, int] = {}
    for path in files:
        name = path.stem if folder.is_file() else path.parent.name
        sizes[name] = sizes.get(name, 0) + 4 * safetensors_elements(path)
    return sizes


def safetensors_elements(path: Path) -> int:
    """Number of floating-point elements in a .safetensors file, from its JSON header."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    count = 0
    for key, entry in header.items():
        if key != "__metadata__" and entry.get("dtype") in SAFETENSORS_ITEM:
            elements = 1
            for d in entry["shape"]:
                elements *= d
            count += elements
    return count


def estimate_peak_bytes(component_bytes: dict[str, int], dtype: str, cuda_fusions: bool) -> int:
    largest = max(component_bytes.values(), default=0)
    factor = EXTRA_FACTOR[(dtype, cuda_fusions)]
    return int(BASE_BYTES + sum(component_bytes.values()) + factor * largest)


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


def check_fits(estimate: int, limit: int | None) -> None:
    """Refuse in one line when `estimate` exceeds `limit` (bytes; None: no check)."""
    if limit is not None and estimate > limit:
        raise UserError(
            f"this export needs about {estimate / GIB:.1f} GiB of RAM, above the "
            f"{limit / GIB:.1f} GiB allowed (--max-memory, default: the memory available now); "
            "free memory, raise --max-memory, or export on a larger machine"
        )
