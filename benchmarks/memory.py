"""Peak memory of one benchmark path, each read the one way its device allows, with that way
named in the result so nobody compares an RSS with a CUDA allocator figure unawares.

A probe is started before the path loads or first runs, sampled after each timed block and
read at the end: {"peak_bytes": int or None, "method": str}.
"""

from __future__ import annotations

import resource
import sys
from typing import Any, Protocol


class MemoryProbe(Protocol):
    def start(self) -> None: ...

    def sample(self) -> None: ...

    def result(self) -> dict[str, Any]: ...


class TorchCudaPeak:
    """PyTorch's allocator peak: weights plus activations, exact, but blind to other libraries."""

    def start(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()

    def sample(self) -> None:
        pass  # the allocator tracks its own peak

    def result(self) -> dict[str, Any]:
        import torch

        return {
            "peak_bytes": int(torch.cuda.max_memory_allocated()),
            "method": "torch.cuda.max_memory_allocated: tensors PyTorch allocated, weights "
            "included",
        }


class ProcessPeakRss:
    """The only peak the CPU offers: it covers the whole process and never goes down."""

    def start(self) -> None:
        pass

    def sample(self) -> None:
        pass

    def result(self) -> dict[str, Any]:
        return {
            "peak_bytes": peak_rss_bytes(),
            "method": "peak RSS of the whole process (resource.getrusage), process-wide: it "
            "includes every model loaded by earlier rows",
        }


class NvmlDeviceUse:
    """Device memory in use (NVML, GPU 0) above what was in use before the path loaded.

    Engine runtimes allocate outside PyTorch, and their arenas only grow, so the largest
    reading after each timed block is the peak to within one block.
    """

    def __init__(self) -> None:
        self.handle: Any = None
        self.baseline = self.peak = 0
        self.missing = ""

    def start(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.missing = "pynvml is not installed; run `pip install nvidia-ml-py`"
            return
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = self.peak = self._used()

    def sample(self) -> None:
        if self.handle is not None:
            self.peak = max(self.peak, self._used())

    def result(self) -> dict[str, Any]:
        method = "NVML device memory in use, max after each timed block minus before loading"
        if self.handle is None:
            return {"peak_bytes": None, "method": method, "reason": self.missing}
        return {"peak_bytes": self.peak - self.baseline, "method": method}

    def _used(self) -> int:
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)


def peak_rss_bytes() -> int:
    """ru_maxrss is in KiB on Linux and in bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def torch_probe(device: str) -> MemoryProbe:
    return TorchCudaPeak() if device == "cuda" else ProcessPeakRss()


def engine_probe(device: str) -> MemoryProbe:
    return NvmlDeviceUse() if device == "cuda" else ProcessPeakRss()
