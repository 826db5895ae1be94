"""Export a component whose weights stay on disk (`lazy_weights`), holding a segment of its
weights at a time.

The graph is traced on placeholder weights into a skeleton whose weights are recipes (a
checkpoint tensor, maybe transposed). The skeleton is cut, in node order, into segments of at
most `SEGMENT_BYTES` of fp32 weights. Each segment in turn gets its weights written from the
checkpoint into a working folder, goes through the same passes as a whole graph does (the
measured fp16 policy, fp16 conversion), runs on ONNX Runtime on the values earlier segments
computed (the verification inputs, and in fp16 the calibration inputs through the fp32
segments), and appends its final weights to the bundle's data file. The graph written is the
segments' nodes in order; the verification run went through exactly those nodes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from tqdm import tqdm

from sdrt.errors import UserError

from .bfloat16 import convert_bf16, emulated_fp32
from .calibration import attention_score_nodes, calibration_providers
from .external_data import pad_to_page, point_at, read_external
from .lazy_weights import placeholders, read_parameter
from .onnx_export import lean_session_options
from .optimize import (
    _read_names,
    convert_fp16,
    keep_fp32_nodes,
    sort_topologically,
    timestep_embedding_nodes,
    with_value_types,
)
from .stages import StageFn

SEGMENT_BYTES = 2**30  # fp32 weight bytes written and measured at once
WEIGHTS = "weights.data"  # a segment's fp32 weights, in its working folder


@dataclass
class Recipe:
    """How to make one initializer: a lazy parameter read from the checkpoint (or a buffer's
    value), permuted by `perm` where the graph transposed it."""

    source: torch.Tensor
    perm: list[int] | None = None

    def shape(self) -> list[int]:
        shape = list(self.source.shape)
        return [shape[p] for p in self.perm] if self.perm else shape

    def value(self) -> np.ndarray:
        tensor = read_parameter(self.source) if hasattr(self.source, "sdrt_source") else self.source
        tensor = tensor.detach()
        if self.perm:
            tensor = tensor.permute(self.perm)
        return np.ascontiguousarray(tensor.numpy())


@dataclass
class Segment:
    nodes: list[onnx.NodeProto]
    weights: list[str] = field(default_factory=list)  # initializer names its nodes read
    inputs: list[str] = field(default_factory=list)  # values computed before it (or fed)
    outputs: list[str] = field(default_factory=list)  # its values later segments read
    aliases: dict[str, str] = field(default_factory=dict)  # weight -> its name in this segment


def export_streamed(
    component: Any,
    trace_feeds: Mapping[str, np.ndarray],
    check_feeds: Mapping[str, np.ndarray],
    path: Path,
    dtype: str,
    stage: StageFn,
    trace: Callable[[Path, tuple[torch.Tensor, ...]], None],
    progress: bool = False,
) -> list[np.ndarray]:
    """Write `component` (lazy weights) to `path` and `path`.data; `trace(out, args)` is the
    exporter run that writes the weight-free graph. Returns the outputs of the verification
    inputs (`check_feeds`), run segment by segment through the graph written."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".stream-") as tmp_name:
        tmp = Path(tmp_name)
        with stage("trace"):
            skeleton, recipes = trace_skeleton(component, trace_feeds, tmp / "traced.onnx", trace)
        segments = split(skeleton, recipes)
        types = value_types(skeleton)
        always = timestep_embedding_nodes(skeleton)
        if component.upcast_attention:
            always |= attention_score_nodes(skeleton)
        fp32_live = [dict(f) for f in (component.calibration or [trace_feeds])]
        check_live = dict(check_feeds)
        last_use = _last_use(segments, [o.name for o in skeleton.graph.output])
        nodes: list[onnx.NodeProto] = []
        initializers: list[TensorProto] = []
        data = path.with_name(f"{path.name}.data")
        bar = tqdm(segments, desc=f"{component.name} segments", leave=False, disable=not progress)
        with data.open("wb") as out, stage("stream"):
            for index, segment in enumerate(bar):
                folder = tmp / f"segment-{index}"
                folder.mkdir()
                model = segment_model(skeleton, segment, recipes, types, folder)
                runnable = model
                if dtype == "fp16":
                    model = runnable = _to_fp16(model, segment, fp32_live, always, folder, index)
                elif dtype == "bf16":  # fp32's range: only what fp16 keeps for precision
                    names = {n.name for n in model.graph.node}
                    converted = convert_bf16(model, sorted(always & names), folder, "bf16.data")
                    _rename_new(converted, model, f"s{index}/")
                    model, runnable = converted, emulated_fp32(converted, folder, "fp32.data")
                check_live.update(run_segment(runnable, folder, check_live, segment.outputs))
                for live in [check_live, *fp32_live]:  # what no later segment reads
                    for name in [n for n in live if last_use.get(n, -1) <= index]:
                        del live[name]
                initializers += _append_weights(model, folder, out, data.name)
                nodes += model.graph.node
                shutil.rmtree(folder)
        graph = helper.make_graph(
            nodes,
            skeleton.graph.name,
            [i for i in skeleton.graph.input if i.name not in recipes],
            list(skeleton.graph.output),
            initializers,
        )
        model = helper.make_model(
            graph, opset_imports=list(skeleton.opset_import), ir_version=skeleton.ir_version
        )
        sort_topologically(model.graph)
        onnx.save_model(model, str(path))
    return [check_live[o.name] for o in skeleton.graph.output]


def trace_skeleton(
    component: Any,
    feeds: Mapping[str, np.ndarray],
    out: Path,
    trace: Callable[[Path, tuple[torch.Tensor, ...]], None],
) -> tuple[onnx.ModelProto, dict[str, Recipe]]:
    """The graph traced on placeholder weights, its weights declared as initializers without
    data, and each one's recipe; a Transpose of a weight becomes a transposed weight."""
    args = tuple(torch.from_numpy(np.asarray(feeds[s.name])) for s in component.inputs)
    with placeholders(component.module) as lazy:
        buffers = dict(component.module.named_buffers())
        trace(out, args)
    model = onnx.load(str(out), load_external_data=False)
    graph = model.graph
    if any(a.HasField("g") or a.graphs for n in graph.node for a in n.attribute):
        raise UserError(f"{component.name}: the graph has control flow, which cannot be streamed")
    recipes = {
        i.name: Recipe(lazy[i.name] if i.name in lazy else buffers[i.name])
        for i in graph.input
        if i.name in lazy or i.name in buffers
    }
    for node in list(graph.node):
        if node.op_type == "Transpose" and node.input[0] in recipes:
            source = recipes[node.input[0]]
            rank = len(source.source.shape)
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            recipes[node.output[0]] = Recipe(source.source, perm or list(range(rank))[::-1])
            graph.node.remove(node)
    read = {name for node in graph.node for name in _read_names(node)}
    recipes = {name: r for name, r in recipes.items() if name in read}
    kept = [
        i for i in graph.input if i.name not in recipes and not _is_weight(i.name, lazy, buffers)
    ]
    del graph.input[:]
    graph.input.extend(kept)
    for name, recipe in recipes.items():
        tensor = helper.make_tensor_value_info(name, _onnx_type(recipe.source), recipe.shape())
        graph.input.append(tensor)  # typed as inputs until each segment writes them
    return model, recipes


def _is_weight(name: str, lazy: Mapping[str, Any], buffers: Mapping[str, Any]) -> bool:
    return name in lazy or name in buffers


def _onnx_type(tensor: torch.Tensor) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(str(tensor.dtype).removeprefix("torch.")))


def split(skeleton: onnx.ModelProto, recipes: Mapping[str, Recipe]) -> list[Segment]:
    """The nodes, in order, cut into segments of at most SEGMENT_BYTES of fp32 weights (a node
    reading more gets a segment of its own); each segment's inputs, outputs and weights."""
    sorted_model = onnx.ModelProto()
    sorted_model.CopyFrom(skeleton)
    sort_topologically(sorted_model.graph)
    segments: list[Segment] = [Segment([])]
    size = 0
    for node in sorted_model.graph.node:
        new = [n for n in _read_names(node) if n in recipes and n not in segments[-1].weights]
        extra = sum(4 * int(np.prod(recipes[n].shape())) for n in new)
        if segments[-1].nodes and size + extra > SEGMENT_BYTES:
            segments.append(Segment([]))
            size = 0
            new = [n for n in _read_names(node) if n in recipes]
            extra = sum(4 * int(np.prod(recipes[n].shape())) for n in new)
        segments[-1].nodes.append(node)
        segments[-1].weights += sorted(set(new))
        size += extra
    seen: set[str] = set()
    for index, segment in enumerate(segments):
        segment.aliases = {n: f"{n}@segment{index}" for n in segment.weights if n in seen}
        seen.update(segment.weights)
    outputs = {o.name for o in skeleton.graph.output}
    produced_in = {o: i for i, s in enumerate(segments) for n in s.nodes for o in n.output if o}
    for index, segment in enumerate(segments):
        reads = {n for node in segment.nodes for n in _read_names(node) if n}
        segment.inputs = sorted(
            n for n in reads if n not in recipes and produced_in.get(n, -1) != index
        )
        later = {n for s in segments[index + 1 :] for node in s.nodes for n in _read_names(node)}
        made = [o for node in segment.nodes for o in node.output if o]
        segment.outputs = [o for o in made if o in later or o in outputs]
    return segments


def _last_use(segments: list[Segment], outputs: list[str]) -> dict[str, int]:
    """The last segment reading each value (the graph's outputs: past the last one)."""
    last = {}
    for index, segment in enumerate(segments):
        for name in segment.inputs:
            last[name] = index
    for name in outputs:
        last[name] = len(segments)
    return last


def segment_model(
    skeleton: onnx.ModelProto,
    segment: Segment,
    recipes: Mapping[str, Recipe],
    types: Mapping[str, int],
    folder: Path,
) -> onnx.ModelProto:
    """`segment` as a model whose weights are written to `folder`/WEIGHTS (fp32, from the
    checkpoint); its inputs and outputs typed as in the skeleton. A weight an earlier segment
    also read gets a name of this segment's (their precisions may differ)."""
    initializers = []
    nodes = [_copy(n) for n in segment.nodes]
    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = segment.aliases.get(name, name)
    with (folder / WEIGHTS).open("wb") as out:
        for name in segment.weights:
            value = recipes[name].value()
            local = segment.aliases.get(name, name)
            tensor = TensorProto(name=local, dims=value.shape)
            tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
            tensor.data_location = TensorProto.EXTERNAL
            offset = pad_to_page(out)
            out.write(value.tobytes())
            point_at(tensor, WEIGHTS, offset, value.nbytes)
            initializers.append(tensor)
    graph = helper.make_graph(
        nodes,
        "segment",
        [helper.make_tensor_value_info(n, types[n], None) for n in segment.inputs],
        [helper.make_tensor_value_info(n, types[n], None) for n in segment.outputs],
        initializers,
    )
    return helper.make_model(
        graph, opset_imports=list(skeleton.opset_import), ir_version=skeleton.ir_version
    )


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def value_types(skeleton: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of the skeleton (from shape inference)."""
    typed = with_value_types(skeleton)
    values = [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values}


def _to_fp16(
    model: onnx.ModelProto,
    segment: Segment,
    fp32_live: list[dict[str, np.ndarray]],
    always: set[str],
    folder: Path,
    index: int,
) -> onnx.ModelProto:
    """The measured fp16 policy on this segment, fed what the fp32 segments before it computed
    from the calibration inputs; advances those values through this segment in fp32."""
    feeds = [{n: live[n] for n in segment.inputs} for live in fp32_live]
    names = {n.name for n in model.graph.node}
    keep = keep_fp32_nodes(
        model, feeds, providers=calibration_providers(), always=always & names, folder=folder
    )
    for live in fp32_live:
        live.update(run_segment(model, folder, live, segment.outputs))
    converted = convert_fp16(model, keep, folder, "fp16.data")
    _rename_new(converted, model, f"s{index}/")
    return converted


def _rename_new(converted: onnx.ModelProto, original: onnx.ModelProto, prefix: str) -> None:
    """Prefix the names the converter made (its casts), which would repeat across segments."""
    graph = converted.graph
    known = {o for n in original.graph.node for o in n.output} | {
        n.name for n in original.graph.node
    }
    known |= {i.name for i in graph.input} | {o.name for o in graph.output}
    known |= {t.name for t in graph.initializer}
    renamed = {o: prefix + o for n in graph.node for o in n.output if o and o not in known}
    for node in graph.node:
        if node.name and node.name not in known:
            node.name = prefix + node.name
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = renamed.get(name, name)
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)


def run_segment(
    model: onnx.ModelProto, folder: Path, live: Mapping[str, np.ndarray], outputs: list[str]
) -> dict[str, np.ndarray]:
    """Run one segment on ONNX Runtime's CPU provider (weights read from `folder`)."""
    import onnxruntime as ort

    options = lean_session_options(ort)
    options.log_severity_level = 3
    file = folder / "segment.onnx"
    onnx.save_model(model, str(file))
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    finally:
        file.unlink()
    feeds = {i.name: live[i.name] for i in model.graph.input}
    return dict(zip(outputs, session.run(outputs, feeds), strict=True))


def _append_weights(
    model: onnx.ModelProto, folder: Path, out: Any, data_name: str
) -> list[TensorProto]:
    """Move the segment's external weights into the bundle's data file; returns them."""
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        raw = read_external(tensor, folder)
        offset = pad_to_page(out)
        out.write(raw)
        point_at(tensor, data_name, offset, len(raw))
    return list(model.graph.initializer)
