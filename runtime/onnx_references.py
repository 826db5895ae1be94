"""What an ONNX file names without loading it: its graph inputs and outputs with their
shapes, how many nodes of each op its main graph holds, and every external-data file its
tensors point at.

Read straight from the protobuf wire format (field numbers from onnx.proto), so the runtime
needs no `onnx` package and never opens a referenced file before the bundle has vetted it.
Tensor payloads are skipped by length, not read.
"""

from __future__ import annotations

import mmap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# onnx.proto field numbers
MODEL_GRAPH, MODEL_TRAINING_INFO, MODEL_FUNCTIONS = 7, 20, 25
TRAINING_GRAPHS = (1, 2)  # TrainingInfoProto.initialization, .algorithm
FUNCTION_NODES = 7
GRAPH_NODES, GRAPH_INITIALIZERS, GRAPH_SPARSE_INITIALIZERS = 1, 5, 15
GRAPH_INPUTS, GRAPH_OUTPUTS = 11, 12
NODE_OP_TYPE, NODE_ATTRIBUTES = 4, 5
ATTRIBUTE_TENSORS = (5, 10)  # t, tensors
ATTRIBUTE_GRAPHS = (6, 11)  # g, graphs
ATTRIBUTE_SPARSE_TENSORS = (22, 23)  # sparse_tensor, sparse_tensors
SPARSE_TENSOR_PARTS = (1, 2)  # values, indices
TENSOR_NAME, TENSOR_EXTERNAL_DATA = 8, 13
VALUE_INFO_NAME, VALUE_INFO_TYPE = 1, 2
TYPE_TENSOR, TENSOR_TYPE_SHAPE, SHAPE_DIM = 1, 2, 1  # TypeProto.tensor_type.shape.dim
DIM_VALUE, DIM_PARAM = 1, 2
ENTRY_KEY, ENTRY_VALUE = 1, 2

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


@dataclass
class GraphReferences:
    inputs: list[str] = field(default_factory=list)  # graph inputs that are not initializers
    outputs: list[str] = field(default_factory=list)
    external_files: set[str] = field(default_factory=set)  # `location` values, as written
    # each main-graph input's and output's dims: a size, a symbol's name, or None if unstated
    shapes: dict[str, list[int | str | None]] = field(default_factory=dict)
    op_counts: Counter[str] = field(default_factory=Counter)  # main graph only


class _Malformed(Exception):
    pass


def graph_references(path: Path) -> GraphReferences:
    """The main graph's inputs/outputs and every external-data location in the file (main
    graph, subgraphs, constants, functions); UserError if it is not an ONNX model."""
    refs = GraphReferences()
    try:
        with path.open("rb") as f:
            if f.seek(0, 2) == 0:
                raise _Malformed("the file is empty")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with data:
            # Walked, not searched: tensor payloads are skipped by their length, so a 490 MB
            # graph with embedded weights costs 10 ms, where a byte search for `location`
            # through all of it cost 230 ms.
            buf = memoryview(data)
            try:
                for number, start, end in _messages(buf, 0, len(buf)):
                    if number == MODEL_GRAPH:
                        _main_graph(buf, start, end, refs)
                    elif number == MODEL_FUNCTIONS:
                        _nodes(buf, start, end, FUNCTION_NODES, refs)
                    elif number == MODEL_TRAINING_INFO:
                        for part, s, e in _messages(buf, start, end):
                            if part in TRAINING_GRAPHS:
                                _graph(buf, s, e, refs)
            finally:
                buf.release()
    except (_Malformed, UnicodeDecodeError) as err:
        raise UserError(
            f"{path} is not a readable ONNX model ({err}); re-export the bundle"
        ) from err
    return refs


def _main_graph(buf: memoryview, start: int, end: int, refs: GraphReferences) -> None:
    inputs, initializers = [], set()
    for number, s, e in _messages(buf, start, end):
        if number in (GRAPH_INPUTS, GRAPH_OUTPUTS):
            name = _string_field(buf, s, e, VALUE_INFO_NAME)
            (inputs if number == GRAPH_INPUTS else refs.outputs).append(name)
            refs.shapes[name] = _shape(buf, s, e)
        elif number == GRAPH_INITIALIZERS:
            initializers.add(_string_field(buf, s, e, TENSOR_NAME))
            _tensor(buf, s, e, refs)
        elif number == GRAPH_SPARSE_INITIALIZERS:
            _sparse_tensor(buf, s, e, refs)
        elif number == GRAPH_NODES:
            refs.op_counts[_node(buf, s, e, refs)] += 1
    refs.inputs = [name for name in inputs if name not in initializers]  # IR < 4 lists both


def _shape(buf: memoryview, start: int, end: int) -> list[int | str | None]:
    """The dims of a ValueInfoProto's tensor type ([] when it states no shape)."""
    dims: list[int | str | None] = []
    for _, ts, te in _numbered(buf, start, end, VALUE_INFO_TYPE):
        for _, ss, se in _numbered(buf, ts, te, TYPE_TENSOR):
            for _, ds, de in _numbered(buf, ss, se, TENSOR_TYPE_SHAPE):
                dims += [_dim(buf, s, e) for _, s, e in _numbered(buf, ds, de, SHAPE_DIM)]
    return dims


def _dim(buf: memoryview, start: int, end: int) -> int | str | None:
    """A TensorShapeProto.Dimension: its dim_value, else its dim_param, else None. Protobuf
    writes fields in number order, so a dim_value (field 1) comes first."""
    if start < end:
        key, pos = _varint(buf, start, end)
        if key == DIM_VALUE << 3 | VARINT:
            return _varint(buf, pos, end)[0]
    return _string_field(buf, start, end, DIM_PARAM) or None


def _numbered(buf: memoryview, start: int, end: int, wanted: int) -> list[tuple[int, int, int]]:
    return [field for field in _messages(buf, start, end) if field[0] == wanted]


def _graph(buf: memoryview, start: int, end: int, refs: GraphReferences) -> None:
    for number, s, e in _messages(buf, start, end):
        if number == GRAPH_INITIALIZERS:
            _tensor(buf, s, e, refs)
        elif number == GRAPH_SPARSE_INITIALIZERS:
            _sparse_tensor(buf, s, e, refs)
        elif number == GRAPH_NODES:
            _node(buf, s, e, refs)


def _nodes(buf: memoryview, start: int, end: int, field_number: int, refs: GraphReferences) -> None:
    for number, s, e in _messages(buf, start, end):
        if number == field_number:
            _node(buf, s, e, refs)


def _node(buf: memoryview, start: int, end: int, refs: GraphReferences) -> str:
    """Record what the node's attributes reference; returns its op_type."""
    op_type = ""
    for number, s, e in _messages(buf, start, end):
        if number == NODE_OP_TYPE:
            op_type = bytes(buf[s:e]).decode("utf-8")
        if number != NODE_ATTRIBUTES:
            continue
        for part, ps, pe in _messages(buf, s, e):
            if part in ATTRIBUTE_TENSORS:
                _tensor(buf, ps, pe, refs)
            elif part in ATTRIBUTE_GRAPHS:
                _graph(buf, ps, pe, refs)
            elif part in ATTRIBUTE_SPARSE_TENSORS:
                _sparse_tensor(buf, ps, pe, refs)
    return op_type


def _sparse_tensor(buf: memoryview, start: int, end: int, refs: GraphReferences) -> None:
    for number, s, e in _messages(buf, start, end):
        if number in SPARSE_TENSOR_PARTS:
            _tensor(buf, s, e, refs)


def _tensor(buf: memoryview, start: int, end: int, refs: GraphReferences) -> None:
    for number, s, e in _messages(buf, start, end):
        if number == TENSOR_EXTERNAL_DATA and _string_field(buf, s, e, ENTRY_KEY) == "location":
            refs.external_files.add(_string_field(buf, s, e, ENTRY_VALUE))


def _string_field(buf: memoryview, start: int, end: int, wanted: int) -> str:
    value = ""
    for number, s, e in _messages(buf, start, end):
        if number == wanted:
            value = bytes(buf[s:e]).decode("utf-8")
    return value


def _messages(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field; other fields are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire == FIXED64:
            pos += 8
        elif wire == FIXED32:
            pos += 4
        elif wire == LENGTH:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed(f"field {number} runs past its message")
            yield number, pos, pos + length
            pos += length
        else:
            raise _Malformed(f"unsupported wire type {wire} at byte {pos}")
        if number == 0 or pos > end:
            raise _Malformed(f"corrupt field at byte {pos}")


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(f"truncated number at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
