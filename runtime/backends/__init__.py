"""Engine backends, one file each, chosen by name; each loads lazily so that only the one in
use needs to be installed."""

from __future__ import annotations

import importlib
from typing import Any

from ..bundle import Bundle
from ..errors import UserError
from .base import Engine

# name -> (module, class, pip extra that installs it)
BACKENDS = {
    "onnxruntime": ("onnxruntime", "OnnxRuntimeEngine", "sdrt"),
    "tensorrt": ("tensorrt", "TensorRTEngine", "sdrt[tensorrt]"),
}


def load_engine(
    backend: str, bundle: Bundle, component: str, device: str, **options: Any
) -> Engine:
    """The engine for `component`; `options` go to the backend (e.g. cuda_graph=True)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module_name, class_name, extra = BACKENDS[backend]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as err:
        raise UserError(
            f"backend {backend!r} is not installed ({err.name} missing); "
            f"run `pip install '{extra}'`"
        ) from err
    return getattr(module, class_name)(bundle, component, device, **options)


__all__ = ["BACKENDS", "Engine", "load_engine"]
