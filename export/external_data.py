"""Weights kept in files beside a weight-free graph, and moved a tensor at a time.

PyTorch's exporter writes a model over 2 GB as a graph plus one file per weight. Loading that
into an onnx proto and saving it again holds every weight in memory at least once more beside
the PyTorch model. Export's graph passes therefore work on a skeleton: a graph whose large
initializers point at files in a working folder (`weights_to_disk`), which ONNX Runtime reads
from there; the bundle's one data file is gathered from them at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import helper
from onnx.external_data_helper import (
    ExternalDataInfo,
    load_external_data_for_model,
    uses_external_data,
)

# Offsets aligned to a page, so ONNX Runtime can map the weights instead of copying them.
ALIGN = 4096
COPY_CHUNK = 2**24
INLINE_THRESHOLD = 1024  # bytes: smaller weights stay in the graph


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The main graph's initializers whose data lies in a file."""
    return [t for t in model.graph.initializer if uses_external_data(t)]


def gather_external_data(model: onnx.ModelProto, source: Path, target: Path) -> None:
    """Append each external tensor of `model` (paths relative to `source`) to `target`, at
    page-aligned offsets, and point `model` at it; never more than one chunk in memory."""
    with target.open("wb") as out:
        for tensor in external_tensors(model):
            info = ExternalDataInfo(tensor)
            offset = pad_to_page(out)
            with (source / info.location).open("rb") as src:
                src.seek(info.offset or 0)
                length = _copy(src, out, info.length)
            point_at(tensor, target.name, offset, length)


def point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
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


def weights_to_disk(model: onnx.ModelProto, folder: Path, name: str) -> None:
    """Move the weights `model` holds in memory to `folder`/`name`.data, leaving `model` a
    skeleton that points there; weights already in files stay where they are."""
    if not any(len(t.raw_data) >= INLINE_THRESHOLD for t in model.graph.initializer):
        return  # nothing to move (onnx would still refuse an existing file of that name)
    onnx.save_model(
        model,
        str(folder / f"{name}.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{name}.data",
        size_threshold=INLINE_THRESHOLD,
    )
    (folder / f"{name}.onnx").unlink()


@contextmanager
def weights_on_disk(model: onnx.ModelProto, folder: Path | None) -> Iterator[Path]:
    """The folder `model`'s external weights are relative to, for ONNX Runtime to read them
    from. `folder` None: `model` holds its weights in memory; they move to a temporary folder
    for the block (a copy would double them) and are read back into `model` after it."""
    if folder is not None:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="sdrt-weights-") as tmp:
        weights_to_disk(model, Path(tmp), "weights")
        try:
            yield Path(tmp)
        finally:
            moved = external_tensors(model)
            load_external_data_for_model(model, tmp)
            for tensor in moved:
                tensor.ClearField("data_location")  # as it was, not set to its default


def read_external(tensor: onnx.TensorProto, folder: Path) -> bytes:
    """The bytes of one external tensor (its location relative to `folder`)."""
    info = ExternalDataInfo(tensor)
    with (folder / info.location).open("rb") as src:
        src.seek(info.offset or 0)
        return src.read() if info.length is None else src.read(info.length)


def pad_to_page(out: BinaryIO) -> int:
    """Pad `out` to the next page-aligned offset, where ONNX Runtime can map a tensor from;
    returns that offset."""
    out.write(b"\0" * (-out.tell() % ALIGN))
    return out.tell()


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's weights held in files (the exporter's omit their length)."""
    return sum(
        int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in external_tensors(model)
    )
