"""What a checkpoint file is, read from its first bytes before anything trusts its numbers.

A .safetensors file starts with an 8-byte header length and a JSON header whose tensors name
their shapes and byte ranges; both are checked against the file's real size before a buffer is
sized from them, so a damaged or hostile file is one line, never a MemoryError. A pickle
checkpoint is recognised by its container (torch.save's zip archive, or a pickle stream),
never unpickled here.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

from sdrt.errors import UserError

# the largest header the safetensors library itself reads (its MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000
# bytes per element of each safetensors dtype (sub-byte float types are not sized here)
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
PICKLE_PROTOCOL = b"\x80"  # a pickle stream of protocol 2 or later opens with PROTO


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensors of a .safetensors file (name -> dtype, shape, data_offsets), each checked to
    lie inside the file and to match its shape; UserError "not a safetensors file" otherwise."""
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        if size < 8:
            raise _not_safetensors(path, f"{size} bytes, too short for the header length")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise _not_safetensors(
                path, f"its header length {length} runs past the end of the {size}-byte file"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _not_safetensors(path, f"its header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name != "__metadata__":
            problem = _tensor_problem(entry, data_bytes)
            if problem:
                raise _not_safetensors(path, f"tensor {name!r} {problem}")
    return header


def _tensor_problem(entry: Any, data_bytes: int) -> str | None:
    """Why a header entry cannot describe a tensor in `data_bytes` of data, or None."""
    if not isinstance(entry, dict):
        return "is not an object"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(entry.get("dtype"), str):
        return "has no dtype"
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        return f"has shape {shape!r}, not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        return f"has data_offsets {offsets!r}, not [begin, end]"
    begin, end = offsets
    if not begin <= end <= data_bytes:
        return f"spans bytes {begin}-{end}, outside the file's {data_bytes} bytes of data"
    item = DTYPE_BYTES.get(entry["dtype"])
    if item is not None and math.prod(shape) * item != end - begin:
        return f"of shape {shape} holds {end - begin} bytes, not {math.prod(shape) * item}"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _not_safetensors(path: Path, reason: str) -> UserError:
    return UserError(f"{path} is not a safetensors file ({reason}); download or convert it again")


def check_pickle_checkpoint(path: Path) -> None:
    """Refuse a pickle-suffixed file that is neither torch.save's zip archive nor a pickle
    stream, before PyTorch tries to read it."""
    with path.open("rb") as f:
        start = f.read(2)
    pickled = start[:1] == PICKLE_PROTOCOL and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not (pickled or zipfile.is_zipfile(path)):
        raise UserError(
            f"{path} is not a PyTorch pickle checkpoint (neither a torch.save zip archive nor "
            "a pickle stream); download or convert it again"
        )
