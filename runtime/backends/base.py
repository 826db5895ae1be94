"""The Engine interface every backend implements: named numpy arrays in, named arrays out."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np

from ..errors import UserError


class Engine(Protocol):
    """One compiled component. `inputs`/`outputs` map names to (dtype, symbolic shape)."""

    inputs: dict[str, tuple[str, list[Any]]]
    outputs: dict[str, tuple[str, list[Any]]]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def io_table(specs: list[dict[str, Any]]) -> dict[str, tuple[str, list[Any]]]:
    """The manifest's list of {name, dtype, shape} as the Engine's name -> (dtype, shape)."""
    return {s["name"]: (s["dtype"], list(s["shape"])) for s in specs}


def upload_constants(engine: Engine, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Feeds that stay fixed over a loop, moved to the engine's device once where the backend
    can hold device values (ONNX Runtime's `to_device`); otherwise the arrays themselves."""
    to_device = getattr(engine, "to_device", None)
    if to_device is None:
        return dict(feeds)
    return {name: to_device(name, value) for name, value in feeds.items()}


class Device(NamedTuple):
    """Where an engine runs: kind "auto", "cpu" or "cuda", and the CUDA device index."""

    kind: str
    index: int = 0


def parse_device(device: str) -> Device:
    """ "auto", "cpu", "cuda" or "cuda:N" as a Device; every backend reads devices through this,
    so "cuda:1" means the second GPU everywhere and a typo is refused rather than run on the
    CPU."""
    if device in ("auto", "cpu", "cuda"):
        return Device(device)
    kind, _, index = device.partition(":")
    if kind == "cuda" and index.isdigit():
        return Device("cuda", int(index))
    raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
