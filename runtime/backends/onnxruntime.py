"""ONNX Runtime backend: CPU provider everywhere, CUDA provider when onnxruntime-gpu has it."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import UserError
from .base import io_table


def providers_for(device: str) -> list[str]:
    """Execution providers for `device` (cpu, cuda or auto), failing clearly when absent."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise UserError(
            "device 'cuda' needs onnxruntime-gpu, which is not installed here; "
            "run `pip install 'sdrt[cuda]'` or use --device cpu"
        )
    return ["CPUExecutionProvider"]


class OnnxRuntimeEngine:
    """One InferenceSession; feeds are cast to the dtypes the graph declares."""

    def __init__(self, bundle: Bundle, component: str, device: str = "auto") -> None:
        import onnxruntime as ort

        info = bundle.components[component]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(bundle.path(component)), options, providers=providers_for(device)
        )
        self.inputs = io_table(info.inputs)
        self.outputs = io_table(info.outputs)
        self.provider = self.session.get_providers()[0]

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        cast = {
            name: np.ascontiguousarray(feeds[name], dtype=dtype)
            for name, (dtype, _) in self.inputs.items()
        }
        values = self.session.run(list(self.outputs), cast)
        return dict(zip(self.outputs, values, strict=True))
