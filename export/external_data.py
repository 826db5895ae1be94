"""Move a traced graph's external weights into the bundle's one data file, a tensor at a time.

PyTorch's exporter writes a model over 2 GB as a graph plus one file per weight. Loading that
into an onnx proto and saving it again holds every weight in memory at least once more beside
the PyTorch model; where no graph pass needs the weights, streaming the files is enough.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

# Offsets aligned to a page, so ONNX Runtime can map the weights instead of copying them.
ALIGN = 4096
COPY_CHUNK = 2**24


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The main graph's initializers whose data lies in a file."""
    return [t for t in model.graph.initializer if uses_external_data(t)]


def gather_external_data(model: onnx.ModelProto, source: Path, target: Path) -> None:
    """Append each external tensor of `model` (paths relative to `source`) to `target`, at
    page-aligned offsets, and point `model` at it; never more than one chunk in memory."""
    with target.open("wb") as out:
        for tensor in external_tensors(model):
            info = ExternalDataInfo(tensor)
            start = -out.tell() % ALIGN
            out.write(b"\0" * start)
            offset = out.tell()
            with (source / info.location).open("rb") as src:
                src.seek(info.offset or 0)
                length = _copy(src, out, info.length)
            _point_at(tensor, target.name, offset, length)


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    # onnx's set_external_data wants the bytes in the proto, which are exactly what is not here
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))


def _copy(src: BinaryIO, out: BinaryIO, length: int | None) -> int:
    """Copy `length` bytes (all that is left when None) in chunks; returns the count."""
    if length is None:
        before = out.tell()
        shutil.copyfileobj(src, out, COPY_CHUNK)
        return out.tell() - before
    left = length
    while left:
        chunk = src.read(min(left, COPY_CHUNK))
        if not chunk:
            raise ValueError(f"external data ends {left} bytes short of its declared length")
        out.write(chunk)
        left -= len(chunk)
    return length
