"""Modules whose weights stay on disk: built without memory, traced on placeholders, run with
each module's weights read from safetensors only while that module computes.

A full-size diffusion transformer (Flux.1's is 47.6 GB in fp32) cannot be held in RAM on a
24 GB machine. Its modules are built with parameters on the meta device (buffers stay real:
they are small and some are computed in __init__), and `WeightSource` knows where each
parameter lies in the checkpoint's safetensors shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.errors import UserError

from .checkpoint_files import safetensors_header

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _header_length(file: Path) -> int:
    with file.open("rb") as f:
        return int.from_bytes(f.read(8), "little")


class WeightSource:
    """The tensors of one model's safetensors files (one file, or shards with an index),
    read a tensor at a time as float32."""

    def __init__(self, files: list[Path], temporary: bool = False) -> None:
        self.temporary = temporary  # export's own (a random-weight folder): removed once used
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, list[int]] = {}
        self._where: dict[str, tuple[str, int, int]] = {}  # key -> dtype, offset, length
        for file in files:
            header = safetensors_header(file)
            start = 8 + _header_length(file)
            for key, entry in header.items():
                if key != "__metadata__":
                    self.files[key] = file
                    self.shapes[key] = list(entry["shape"])
                    begin, end = entry["data_offsets"]
                    self._where[key] = (entry["dtype"], start + begin, end - begin)

    @classmethod
    def of_folder(cls, folder: Path, temporary: bool = False) -> WeightSource:
        """A diffusers or transformers component folder's weights (sharded or not)."""
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            files = sorted({folder / name for name in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder} holds no .safetensors weights")
        return cls(files, temporary)

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` as float32 (a checkpoint in bf16/fp16 is widened here). Read with
        plain file reads, not mapped: mapped pages of a file stay in the process's RSS while
        the mapping lives, and a transformer's shards are bigger than the RAM."""
        if key not in self._where:
            raise UserError(f"the checkpoint has no tensor {key!r}; is it the model's own?")
        dtype, offset, length = self._where[key]
        if dtype not in DTYPES:
            raise UserError(f"weight {key!r} is {dtype}; sdrt reads F32, F16 and BF16 weights")
        with self.files[key].open("rb") as f:
            f.seek(offset)
            raw = np.fromfile(f, DTYPES[dtype], length // np.dtype(DTYPES[dtype]).itemsize)
        if dtype == "BF16":  # the upper half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return torch.from_numpy(raw.astype(np.float32, copy=False).reshape(self.shapes[key]))


def bound_parameters(module: torch.nn.Module, source: WeightSource, prefix: str = "") -> None:
    """Record on each parameter of `module` (on the meta device) the checkpoint key it is
    read from, so any wrapper around `module` still finds it; checks every shape now."""
    for name, param in module.named_parameters():
        key = prefix + name
        if key not in source.shapes:
            raise UserError(f"the checkpoint has no weight {key!r} for {type(module).__name__}")
        if source.shapes[key] != list(param.shape):
            raise UserError(
                f"weight {key!r} has shape {source.shapes[key]} in the checkpoint, but the "
                f"model's configuration makes it {list(param.shape)}"
            )
        param.sdrt_source = (source, key)  # type: ignore[attr-defined]


def is_lazy(module: torch.nn.Module) -> bool:
    """Whether `module`'s weights are on disk (built by `empty_weights`, bound to a source)."""
    return any(hasattr(p, "sdrt_source") for p in module.parameters())


def discard_sources(module: torch.nn.Module, later: list[torch.nn.Module]) -> None:
    """Delete the files of `module`'s temporary sources that no `later` module reads: a
    full-size random-weight folder then never holds the disk twice beside the bundle."""
    kept = {
        id(p.sdrt_source[0]) for m in later for p in m.parameters() if hasattr(p, "sdrt_source")
    }
    for param in module.parameters():
        source = getattr(param, "sdrt_source", (None,))[0]
        if source is not None and source.temporary and id(source) not in kept:
            for file in set(source.files.values()):
                file.unlink(missing_ok=True)


def read_parameter(param: torch.nn.Parameter) -> torch.Tensor:
    source, key = param.sdrt_source  # type: ignore[attr-defined]
    return source.read(key)


@contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init);
    buffers are made as usual."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _owned(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                yield owner, name, param


@contextmanager
def placeholders(module: torch.nn.Module) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Each lazy parameter swapped for a stand-in of its shape that holds one number (a
    stride-0 view), distinct per parameter so the exporter does not merge equal weights;
    yields the stand-ins' names in `module` -> the lazy parameters they stand for."""
    swapped = []
    stand_ins: dict[int, torch.nn.Parameter] = {}
    for index, (owner, name, param) in enumerate(_owned(module)):
        if not hasattr(param, "sdrt_source"):
            continue
        if id(param) not in stand_ins:  # tied weights keep one stand-in
            value = torch.full((), 1.0 + index * 1e-4, dtype=torch.float32)
            stand_ins[id(param)] = torch.nn.Parameter(value.expand(param.shape), False)
        swapped.append((owner, name, param))
        owner._parameters[name] = stand_ins[id(param)]
    lazy = {id(stand_ins[id(p)]): p for _, _, p in swapped}
    try:
        yield {n: lazy[id(p)] for n, p in module.named_parameters() if id(p) in lazy}
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


@contextmanager
def weights_while_called(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` with each submodule's own lazy weights read in just before that submodule
    computes and dropped right after: PyTorch holds one layer's weights at a time."""

    def load(owner: torch.nn.Module, args: Any) -> None:
        for name, param in owner._parameters.items():
            if param is not None and hasattr(param, "sdrt_source"):
                owner._parameters[name] = torch.nn.Parameter(read_parameter(param), False)
                owner._parameters[name].sdrt_lazy = param  # type: ignore[attr-defined]

    def drop(owner: torch.nn.Module, args: Any, output: Any) -> None:
        for name, param in owner._parameters.items():
            if param is not None and hasattr(param, "sdrt_lazy"):
                owner._parameters[name] = param.sdrt_lazy

    hooks = []
    for owner in module.modules():
        if any(hasattr(p, "sdrt_source") for p in owner._parameters.values() if p is not None):
            hooks.append(owner.register_forward_pre_hook(load))
            hooks.append(owner.register_forward_hook(drop))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
