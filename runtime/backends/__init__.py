"""Engine backends, one file each, chosen by name; each loads lazily so that only the one in
use needs to be installed."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..bundle import Bundle
from ..errors import UserError
from .base import Engine

# name -> (module, class, the pip command that installs it)
BACKENDS = {
    "onnxruntime": (
        "onnxruntime",
        "OnnxRuntimeEngine",
        "`pip install 'sdrt[cpu]'`, or on an NVIDIA GPU `pip install 'sdrt[cuda13]'` "
        "(CUDA 13 driver) or `pip install 'sdrt[cuda12]'` (CUDA 12)",
    ),
    "tensorrt": ("tensorrt", "TensorRTEngine", "`pip install 'sdrt[tensorrt]'`"),
}
# Backends whose engines `Pipeline.load` makes in parallel threads: ONNX Runtime releases the
# GIL while it builds a session, and its sessions share nothing. TensorRT loads one engine at
# a time (its CUDA context is per thread, and threaded loading is unmeasured).
PARALLEL_LOAD = frozenset({"onnxruntime"})


def load_engine(
    backend: str, bundle: Bundle, component: str, device: str, **options: Any
) -> Engine:
    """The engine for `component`; `options` go to the backend (e.g. cuda_graph=True)."""
    return engine_class(backend)(bundle, component, device, **options)


def engine_class(backend: str) -> Any:
    """The backend's engine class, its module imported now; UserError when the name is unknown
    or the backend is not installed."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module_name, class_name, install = BACKENDS[backend]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as err:
        raise UserError(
            f"backend {backend!r} is not installed ({err.name} missing); run {install}"
        ) from err
    return getattr(module, class_name)


def check_backend_options(backend: str, options: dict[str, Any]) -> None:
    """Refuse an option the backend's engines do not take, naming those they do, before the
    bundle is read (rather than a TypeError from inside `Pipeline.load`'s loading threads)."""
    parameters = inspect.signature(engine_class(backend).__init__).parameters.values()
    valid = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(
            f"Pipeline.load got unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
            f"for backend {backend!r}; it takes {', '.join(valid)} (beside backend, device, "
            "verify, trusted_key)"
        )


__all__ = [
    "BACKENDS",
    "PARALLEL_LOAD",
    "Engine",
    "check_backend_options",
    "engine_class",
    "load_engine",
]
