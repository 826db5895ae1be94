"""ONNX Runtime CUDA's Stable Diffusion fusions on our exports, checked on the CPU.

ORT's transformer optimizer (model type "unet") turns convolutions channels-last (NhwcConv)
and fuses GroupNorm(+SiLU), Add+GroupNorm (SkipGroupNorm), GEGLU (BiasSplitGelu) and
bias+residual adds (BiasAdd) into contrib ops that only its CUDA provider implements. Its
attention fusion is left off: that pattern no longer matches today's exports, and
`--fused-attention` emits MultiHeadAttention at export time instead.

Those ops have no CPU kernels, so `lower_cuda_ops` writes each one back as standard ONNX,
following the operator specifications. Running the lowered graph on ORT CPU against PyTorch
checks the rewrite and the fp16 policy: everything but the CUDA kernels themselves. The CUDA
kernels accept fewer shapes and types than the ops' specifications (and than the lowering), so
`unfuse_unsupported` writes back as standard ONNX every fused node those kernels would refuse.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .external_data import weights_to_disk

MS_DOMAIN = "com.microsoft"
CUDA_ONLY_OPS = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd")
LOWERED = "/lowered/"  # lowered node names: <fused node name>/lowered/<n>
TO_NCHW = [0, 3, 1, 2]
TO_NHWC = [0, 2, 3, 1]
# What ORT's CUDA kernels accept, from onnxruntime/contrib_ops/cuda/diffusion/:
# bias_split_gelu.cc refuses a last dimension outside these, bias_add.cc channels outside these,
# and group_norm.cc (GroupNorm and SkipGroupNorm) refuses channels_last=0 and gamma or beta
# not float.
BIAS_SPLIT_GELU_WIDTHS = (2560, 5120, 10240)
BIAS_ADD_CHANNELS = (320, 640, 1280)


def fuse_for_cuda(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """`model` (fp32, as exported) rewritten with ORT CUDA's SD fusions, attention excepted.

    `model`'s weights lie in files in `folder` (those it holds in memory are moved there
    first), and so do the fused graph's: the convolution weights the pass transposes for
    NhwcConv go to `sdrt-nhwc.data`. The pass copies the model for shape inference several
    times, which with an SD 1.5 U-Net's 3.4 GB inline took the 24 GB export machine out of
    memory; a skeleton costs nothing to copy. It reads the weights it needs relative to the
    working directory, so that is `folder` for its duration.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.onnx_model_unet import UnetOnnxModel

    options = FusionOptions("unet")
    options.enable_attention = False  # see the module docstring
    options.enable_packed_qkv = options.enable_packed_kv = False  # attention options only
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    cwd = os.getcwd()
    quiet.setLevel(logging.ERROR)
    try:
        os.chdir(folder)
        with redirect_stderr(io.StringIO()):  # its own progress bar, per component
            weights_to_disk(model, folder, "sdrt-inline")
            fused = UnetOnnxModel(model, num_heads=0, hidden_size=0)
            fused.optimize(options)
            model = fused.model
            del fused  # and the copies its shape inference holds
            weights_to_disk(model, folder, "sdrt-nhwc")  # the transposed convolutions
            # NhwcConv's fusion casts each input to its weights' type where it cannot tell
            # the input's: in our fp32 graphs a no-op, which fp16 conversion would keep
            OnnxModel(model).remove_useless_cast_nodes()
    finally:
        os.chdir(cwd)
        quiet.setLevel(level)
    if cuda_only_ops(model) and MS_DOMAIN not in {o.domain for o in model.opset_import}:
        # The optimizer adds contrib ops without importing their domain (its command-line
        # wrapper does that); without the import ORT refuses to load the graph.
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def cuda_only_ops(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each CUDA-only contrib op the graph holds (absent ops left out)."""
    counts = Counter(
        n.op_type for n in model.graph.node if n.domain == MS_DOMAIN and n.op_type in CUDA_ONLY_OPS
    )
    return dict(sorted(counts.items()))


def fused_node_names(names: Iterable[str], present: Container[str] = ()) -> list[str]:
    """Names in a lowered graph mapped back to the fused graph: a lowered node stands for the
    fused node it came from, so keeping it in fp32 keeps that node in fp32. Names `present` in
    the fused graph (nodes already unfused there) stay as they are."""
    return sorted({name if name in present else name.split(LOWERED)[0] for name in names})


# ---------------------------------------------------------------------------------------------
# What the CUDA kernels accept


def kernel_refusal(
    node: onnx.NodeProto, types: dict[str, int], dims: dict[str, list[int]]
) -> str | None:
    """Why ORT's CUDA kernel would refuse `node` (a CUDA-only op), or None if it runs it.
    `types` and `dims` hold the element types and shapes known for the graph's tensors."""
    op = node.op_type
    if op == "BiasSplitGelu":
        width = (dims.get(node.input[1]) or [None])[-1]
        if width not in BIAS_SPLIT_GELU_WIDTHS:
            return f"BiasSplitGelu width {width}: the CUDA kernel takes 2560, 5120 or 10240"
    elif op == "BiasAdd":
        width = (dims.get(node.input[1]) or [None])[-1]
        if width not in BIAS_ADD_CHANNELS:
            return f"BiasAdd channels {width}: the CUDA kernel takes 320, 640 or 1280"
    elif op in ("GroupNorm", "SkipGroupNorm"):
        attrs = attributes(node)
        if not attrs.get("channels_last", 1):
            return f"{op} channels_last=0: the CUDA kernel takes channels_last=1 only"
        gamma, beta = node.input[1:3]
        if types.get(gamma) != onnx.TensorProto.FLOAT or types.get(beta) != onnx.TensorProto.FLOAT:
            return f"{op} gamma/beta not float32: the CUDA kernel takes float32 only"
    return None


def unfuse_unsupported(model: onnx.ModelProto) -> dict[str, int]:
    """Write back as standard ONNX, in place, every CUDA-only node whose CUDA kernel would
    refuse it; returns how many nodes each reason unfused. Run it after fusion and again after
    the fp16 conversion (which decides the types)."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input)}
    types |= {t.name: t.data_type for t in graph.initializer}
    types |= {
        n.output[0]: int(attributes(n)["to"])  # type: ignore[call-overload]
        for n in graph.node
        if n.op_type == "Cast"
    }
    dims = {t.name: list(t.dims) for t in graph.initializer}
    reasons = {
        node.name: reason
        for node in graph.node
        if node.domain == MS_DOMAIN
        and node.op_type in CUDA_ONLY_OPS
        and (reason := kernel_refusal(node, types, dims))
    }
    if reasons:
        replace_nodes(graph, lowered_nodes(graph, set(reasons)))
    return dict(Counter(reasons.values()))


# ---------------------------------------------------------------------------------------------
# Lowering to standard ONNX


@dataclass
class Emitter:
    """Collects the standard nodes that replace one fused node."""

    prefix: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)

    def op(
        self, op_type: str, inputs: list[str], output: str | None = None, **attrs: object
    ) -> str:
        name = f"{self.prefix}{LOWERED}{len(self.nodes)}"
        out = output or f"{name}:0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def const(self, values: object, like: str | None = None) -> str:
        """A Constant node (shape arguments stay readable wherever weights are stored); float
        ones are cast like `like` so fp16 graphs stay one type."""
        name = self.op("Constant", [], value=numpy_helper.from_array(np.asarray(values)))
        return self.op("CastLike", [name, like]) if like else name


def lower_cuda_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every CUDA-only contrib op written as standard ONNX ops."""
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    replace_nodes(lowered.graph, lowered_nodes(model.graph))
    return lowered


@contextmanager
def cuda_ops_lowered(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """`model` itself, its CUDA-only ops written as standard ONNX until the block ends.
    Only the node list is swapped: a copy of the model would double gigabytes of weights."""
    if not cuda_only_ops(model):
        yield model
        return
    fused = [copied(n) for n in model.graph.node]
    replace_nodes(model.graph, lowered_nodes(model.graph))
    try:
        yield model
    finally:
        replace_nodes(model.graph, fused)


def lowered_nodes(
    graph: onnx.GraphProto, only: Container[str] | None = None
) -> list[onnx.NodeProto]:
    """Copies of the graph's nodes, each CUDA-only contrib op (or those named in `only`)
    replaced by its lowering."""
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*graph.value_info, *graph.input, *graph.output)
        if v.type.tensor_type.HasField("shape")
    }
    ranks |= {t.name: len(t.dims) for t in graph.initializer}
    widths = {t.name: int(t.dims[-1]) for t in graph.initializer if t.dims}
    nodes = []
    for node in graph.node:
        fused = node.domain == MS_DOMAIN and node.op_type in CUDA_ONLY_OPS
        if not fused or (only is not None and node.name not in only):
            nodes.append(copied(node))
            continue
        emit = Emitter(node.name or f"{node.op_type}_{len(nodes)}")
        LOWERINGS[node.op_type](node, emit, ranks, widths)
        nodes.extend(emit.nodes)
    return nodes


def replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    del graph.node[:]
    graph.node.extend(nodes)


def copied(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _nhwc_conv(node: onnx.NodeProto, emit: Emitter, *_: object) -> None:
    """NhwcConv: Conv on NHWC input with [M, kH, kW, C/group] weights."""
    x, w, *bias = node.input
    conv = emit.op(
        "Conv",
        [emit.op("Transpose", [x], perm=TO_NCHW), emit.op("Transpose", [w], perm=TO_NCHW), *bias],
        **attributes(node),
    )
    emit.op("Transpose", [conv], node.output[0], perm=TO_NHWC)


def group_norm(
    emit: Emitter, x: str, gamma: str, beta: str, attrs: dict[str, object], output: str
) -> None:
    """GroupNorm: per (sample, group) normalisation, per-channel affine, optional SiLU."""
    channels_last = attrs.get("channels_last", 1)
    nchw = emit.op("Transpose", [x], perm=TO_NCHW) if channels_last else x
    groups = int(attrs["groups"])  # type: ignore[call-overload]
    grouped = emit.op("Reshape", [nchw, emit.const(np.array([0, groups, -1], np.int64))])
    normed = emit.op(
        "InstanceNormalization",
        [
            grouped,
            emit.const(np.ones(groups, np.float32), x),
            emit.const(np.zeros(groups, np.float32), x),
        ],
        epsilon=float(attrs.get("epsilon", 1e-5)),  # type: ignore[arg-type]
    )
    normed = emit.op("Reshape", [normed, emit.op("Shape", [nchw])])
    if channels_last:
        normed = emit.op("Transpose", [normed], perm=TO_NHWC)
        scale, shift = emit.op("CastLike", [gamma, x]), emit.op("CastLike", [beta, x])
    else:
        per_channel = emit.const(np.array([-1, 1, 1], np.int64))
        scale = emit.op("Reshape", [emit.op("CastLike", [gamma, x]), per_channel])
        shift = emit.op("Reshape", [emit.op("CastLike", [beta, x]), per_channel])
    affine = emit.op("Add", [emit.op("Mul", [normed, scale]), shift])
    if attrs.get("activation", 0):
        emit.op("Mul", [affine, emit.op("Sigmoid", [affine])], output)
    else:
        emit.op("Identity", [affine], output)


def _group_norm(node: onnx.NodeProto, emit: Emitter, *_: object) -> None:
    x, gamma, beta = node.input
    group_norm(emit, x, gamma, beta, attributes(node), node.output[0])


def _skip_group_norm(
    node: onnx.NodeProto, emit: Emitter, ranks: dict[str, int], *_: object
) -> None:
    """SkipGroupNorm: S = X + skip (+ bias), Y = GroupNorm(S); NHWC only. The skip is 4-D,
    (N, H, W, C) or (N, 1, 1, C), wherever ORT's fusion made it (it fuses 4-D Adds only); a
    skip known to be 2-D, (N, C), is one value per sample and channel."""
    x, gamma, beta, skip, *bias = node.input
    if ranks.get(skip) == 2:
        skip = emit.op("Unsqueeze", [skip, emit.const(np.array([1, 2], np.int64))])
    total = emit.op("Add", [x, skip])
    if bias and bias[0]:
        total = emit.op("Add", [total, bias[0]])
    group_norm(emit, total, gamma, beta, attributes(node), node.output[0])
    if len(node.output) > 1 and node.output[1]:
        emit.op("Identity", [total], node.output[1])


def _bias_split_gelu(
    node: onnx.NodeProto, emit: Emitter, _: object, widths: dict[str, int]
) -> None:
    """BiasSplitGelu: (X + bias) split in halves on the last axis, first * Gelu(second)."""
    x, bias = node.input
    if bias not in widths:
        raise ValueError(f"{node.name}: its bias {bias!r} is not a constant of known width")
    half = widths[bias] // 2
    first = f"{emit.prefix}{LOWERED}first"
    second = f"{emit.prefix}{LOWERED}second"
    emit.nodes.append(
        helper.make_node(
            "Split",
            [emit.op("Add", [x, bias]), emit.const(np.array([half, half], np.int64))],
            [first, second],
            name=f"{emit.prefix}{LOWERED}split",
            axis=-1,
        )
    )
    erf = emit.op("Erf", [emit.op("Div", [second, emit.const(np.float32(np.sqrt(2.0)), x)])])
    gelu = emit.op(
        "Mul",
        [
            emit.op("Mul", [second, emit.const(np.float32(0.5), x)]),
            emit.op("Add", [erf, emit.const(np.float32(1.0), x)]),
        ],
    )
    emit.op("Mul", [first, gelu], node.output[0])


def _bias_add(node: onnx.NodeProto, emit: Emitter, *_: object) -> None:
    """BiasAdd: X + bias + skip."""
    x, bias, skip = node.input
    emit.op("Add", [emit.op("Add", [x, bias]), skip], node.output[0])


LOWERINGS = {
    "NhwcConv": _nhwc_conv,
    "GroupNorm": _group_norm,
    "SkipGroupNorm": _skip_group_norm,
    "BiasSplitGelu": _bias_split_gelu,
    "BiasAdd": _bias_add,
}
