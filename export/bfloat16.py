"""bf16 graphs: the fp16 graph's shape with bfloat16 in place of float16, and an fp32 emulation
of one that ONNX Runtime's CPU provider can run.

bf16 has fp32's exponent range, so nothing is kept fp32 for range; what stays fp32 is what
fp16 keeps for precision (the timestep embedding, RoPE angles, SD 2.x's attention scores), since
bf16 has fewer mantissa bits than fp16. ONNX Runtime 1.32's CPU provider runs Cast to and from
bf16 but no bf16 MatMul, Add or Mul, so export verifies `emulated_fp32`: the same graph, weights
rounded to bf16, and every bf16 tensor rounded to bf16 where it is made, with fp32 kernels.
That checks the graph, the casts and bf16's rounding of weights and activations; what bf16
kernels do inside (accumulation, fused ops) is left to the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ml_dtypes  # numpy's bfloat16, a dependency of onnx
import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper
from onnx.external_data_helper import uses_external_data

from .calibration import attention_score_nodes
from .external_data import pad_to_page, point_at, read_external
from .optimize import convert_fp16, timestep_embedding_nodes, with_value_types

BF16 = TensorProto.BFLOAT16
FP16 = TensorProto.FLOAT16
FP32 = TensorProto.FLOAT
TYPE_ATTRIBUTES = ("to", "dtype")  # integer attributes naming an element type
# Emulated bf16 vs PyTorch fp32, measured on tiny, tiny-sd3 and tiny-flux: the VAE decoder is
# the worst (4.8e-2 on tiny; diffusers' own bf16 run gives 3.5e-2 there), the rest under 1.8e-2.
BF16_TOLERANCE = 6e-2
# what a bf16 component's manifest parity says was and was not checked
BF16_PARITY = {
    "runtime": "ONNX Runtime CPU, bf16 emulated",
    "check": "bf16 graph run in fp32 with every bf16 weight and tensor rounded to bf16",
    "note": "bf16 arithmetic unverified on the CPU (no bf16 kernels there); not run on a GPU",
}


def bf16_bytes(values: np.ndarray) -> bytes:
    """fp32 values rounded to the nearest bf16 (ties to even), as stored."""
    return values.astype(ml_dtypes.bfloat16).tobytes()


def bf16_keep(model: onnx.ModelProto, upcast_attention: bool) -> list[str]:
    """The nodes a bf16 graph keeps fp32: those fp16 keeps for precision, not for range."""
    keep = timestep_embedding_nodes(model)
    if upcast_attention:
        keep |= attention_score_nodes(model)
    return sorted(keep)


def convert_bf16(
    model: onnx.ModelProto,
    keep_fp32: Sequence[str] = (),
    folder: Path | None = None,
    weights: str | None = None,
) -> onnx.ModelProto:
    """bf16 copy of `model` (fp32) with fp32 inputs/outputs and the `keep_fp32` nodes in fp32:
    `convert_fp16`'s graph, casts and blocked ops with bf16 for fp16, every weight rounded
    from its fp32 value (never through fp16, which would clip it to 65504)."""
    converted = convert_fp16(model, keep_fp32, folder, weights, encode=bf16_bytes)
    to_bf16(converted, model)
    return converted


def to_bf16(converted: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Retype the fp16 converter's output `converted` to bf16 in place; tensors it holds in
    memory are rounded again from their fp32 values in `original`."""
    graph = converted.graph
    initializers = {t.name: t for t in original.graph.initializer}
    made_by = {o: n for n in original.graph.node for o in n.output if o}
    for tensor in graph.initializer:
        if tensor.data_type != FP16:
            continue
        if uses_external_data(tensor):  # already bf16 bytes (`encode`)
            tensor.data_type = BF16
        else:
            _round_to_bf16(tensor, initializers.get(tensor.name))
    for node in graph.node:
        source = made_by.get(node.output[0]) if node.output else None
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR and attr.t.data_type == FP16:
                _round_to_bf16(attr.t, _tensor_attribute(source, attr.name))
            elif attr.type == AttributeProto.INT and attr.name in TYPE_ATTRIBUTES:
                attr.i = BF16 if attr.i == FP16 else attr.i
    _retype_values(graph, FP16, BF16)


def _tensor_attribute(node: onnx.NodeProto | None, name: str) -> TensorProto | None:
    if node is None:
        return None
    return next((a.t for a in node.attribute if a.name == name), None)


def _round_to_bf16(tensor: TensorProto, original: TensorProto | None) -> None:
    """Replace `tensor`'s values by bf16 ones, from `original` where it has the fp32 values."""
    fp32 = original is not None and original.data_type == FP32 and not uses_external_data(original)
    values = numpy_helper.to_array(original if fp32 else tensor).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(values.astype(ml_dtypes.bfloat16), tensor.name))


def _retype_values(graph: onnx.GraphProto, old: int, new: int) -> None:
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.tensor_type.elem_type == old:
            value.type.tensor_type.elem_type = new


def is_bf16(model: onnx.ModelProto) -> bool:
    """Whether `model` holds bf16 weights or casts to bf16 (a bundle's bf16 graph)."""
    casts = (
        a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"
    )
    return BF16 in casts or any(t.data_type == BF16 for t in model.graph.initializer)


def emulated_fp32(model: onnx.ModelProto, folder: Path, weights: str) -> onnx.ModelProto:
    """An fp32 copy of the bf16 `model` (external weights relative to `folder`) that rounds
    each bf16 tensor to bf16 where it is made (Cast to bf16 and back), so fp32 kernels see
    the values bf16 storage would hold. Its bf16 weights, upcast exactly, go to
    `folder`/`weights`; its fp32 ones stay where they are."""
    bf16_values = {
        v.name
        for v in with_value_types(model).graph.value_info
        if v.type.tensor_type.elem_type == BF16
    }
    emulated = onnx.ModelProto()
    emulated.CopyFrom(model)
    graph = emulated.graph
    _upcast_weights(graph, folder, weights)
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR and attr.t.data_type == BF16:
                _upcast(attr.t)
            elif attr.type == AttributeProto.INT and attr.name in TYPE_ATTRIBUTES:
                attr.i = FP32 if attr.i == BF16 else attr.i
        rounded = [o for o in node.output if o in bf16_values]
        for name in rounded:
            node.output[list(node.output).index(name)] = f"{name}/fp32"
        nodes.append(node)
        for name in rounded:
            nodes += [
                onnx.helper.make_node("Cast", [f"{name}/fp32"], [f"{name}/bf16"], to=BF16),
                onnx.helper.make_node("Cast", [f"{name}/bf16"], [name], to=FP32),
            ]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # retyped throughout; ONNX Runtime infers them again
    _retype_values(graph, BF16, FP32)
    return emulated


def _upcast(tensor: TensorProto) -> None:
    values = numpy_helper.to_array(tensor).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def _upcast_weights(graph: onnx.GraphProto, folder: Path, name: str) -> None:
    """bf16 initializers to fp32 (exact): in memory, or a tensor at a time into `folder`/`name`."""
    with (folder / name).open("wb") as out:
        for tensor in graph.initializer:
            if tensor.data_type != BF16:
                continue
            if not uses_external_data(tensor):
                _upcast(tensor)
                continue
            raw = np.frombuffer(read_external(tensor, folder), ml_dtypes.bfloat16)
            data = raw.astype(np.float32).tobytes()
            point_at(tensor, name, pad_to_page(out), len(data))
            out.write(data)
            tensor.data_type = FP32
