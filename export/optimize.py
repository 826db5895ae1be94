"""Make exported graphs fast on ONNX Runtime CUDA without changing what they compute.

Three levers, each checked on ORT CPU: attention emitted as one com.microsoft MultiHeadAttention
node per attention module, an fp16 policy measured from the model's own activations, and
static-shape copies of a graph so ORT can fold its shape arithmetic and capture a CUDA graph.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto

from sdrt.bundle import file_sha256

from .external_data import (
    external_tensors,
    pad_to_page,
    point_at,
    read_external,
    weights_on_disk,
)

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
CPU = ("CPUExecutionProvider",)
# Graph inputs whose sinusoidal embedding diffusers computes in fp32 (`get_timestep_embedding`,
# then `.to(sample.dtype)` before the first Linear): the U-Net's timestep and SDXL's time_ids,
# Flux-dev's guidance scale (x 1000, the same embedding), and Flux's position ids, whose RoPE
# angles and rotation diffusers computes in fp32 up to the attention's MatMul.
EMBEDDED_INPUTS = ("timestep", "time_ids", "guidance", "img_ids", "txt_ids")
LINEAR_OPS = ("MatMul", "Gemm")

# ---------------------------------------------------------------------------------------------
# Fused attention at export time


def attention_bsh(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on [batch, seq, heads * head_dim] tensors, the layout that
    com.microsoft MultiHeadAttention takes, so eager and exported graphs share one definition."""
    batch, q_len, _ = query.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, num_heads, x.shape[-1] // num_heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), scale=scale)
    return out.transpose(1, 2).reshape(batch, q_len, value.shape[-1])


class MultiHeadAttentionFunction(torch.autograd.Function):
    """Eager: `attention_bsh`. Traced by the legacy exporter: one MultiHeadAttention node, which
    ORT CUDA runs as a flash / memory-efficient kernel instead of MatMul-Softmax-MatMul."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        num_heads: int,
        scale: float | None,
    ) -> torch.Tensor:
        return attention_bsh(query, key, value, num_heads, scale)

    @staticmethod
    def symbolic(
        g: Any, query: Any, key: Any, value: Any, num_heads: int, scale: float | None
    ) -> Any:
        attrs: dict[str, Any] = {"num_heads_i": num_heads}
        if scale is not None:
            attrs["scale_f"] = scale
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, **attrs)
        out.setType(query.type())  # [B, S_q, hidden]: q and v widths are equal where we fuse
        return out


class FusedAttentionProcessor:
    """diffusers attention processor computing what AttnProcessor2_0 computes, with its core
    in `MultiHeadAttentionFunction`. Cases the contrib op cannot express (an attention mask,
    per-head q/k norms, unequal q/k/v widths) go to the processor it replaced."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not fusable(attn) or attention_mask is not None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        hidden_states = MultiHeadAttentionFunction.apply(
            query, key, value, attn.heads, nondefault_scale(attn)
        ).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def fusable(attn: Any) -> bool:
    """MultiHeadAttention needs q and k of one width, v of that width here, no per-head norms."""
    width = attn.to_q.out_features
    return (
        attn.norm_q is None
        and attn.norm_k is None
        and attn.to_k.out_features == width
        and attn.to_v.out_features == width
        and width % attn.heads == 0
    )


def nondefault_scale(attn: Any) -> float | None:
    """The softmax scale, or None where it is 1/sqrt(head_dim), the op's own default."""
    head_dim = attn.to_q.out_features // attn.heads
    return None if math.isclose(attn.scale, head_dim**-0.5, rel_tol=1e-9) else float(attn.scale)


@contextmanager
def fused_attention_for_export(model: torch.nn.Module) -> Iterator[list[str]]:
    """Install `FusedAttentionProcessor` on every diffusers attention module of `model` that
    runs the standard SDPA processor; yields their names; restores the originals on exit.

    Wrap the torch.onnx.export call (legacy exporter) in it; the exported graph then holds
    one MultiHeadAttention node per yielded name.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    replaced: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention) and type(module.processor) in (
            AttnProcessor,
            AttnProcessor2_0,
        ):
            replaced[name] = module.processor
    try:
        for name, processor in replaced.items():
            model.get_submodule(name).set_processor(FusedAttentionProcessor(processor))
        yield list(replaced)
    finally:
        for name, processor in replaced.items():
            model.get_submodule(name).set_processor(processor)


def count_nodes(model: onnx.ModelProto, op_type: str, domain: str = "") -> int:
    """Nodes of one op in the main graph; export checks that fusion happened with it."""
    return sum(n.op_type == op_type and n.domain == domain for n in model.graph.node)


# ---------------------------------------------------------------------------------------------
# fp16 policy by measurement


@dataclass(frozen=True)
class TensorStats:
    peak: float  # largest finite |x| (0.0 when there is none)
    finite: bool  # no inf and no nan


def calibration_stats(
    model: onnx.ModelProto,
    calibration: Sequence[Mapping[str, np.ndarray]],
    providers: Sequence[str] = CPU,
    chunk: int | None = None,
    folder: Path | None = None,
) -> dict[str, TensorStats]:
    """Summarise every floating-point tensor of `model` (graph inputs, initializers, node
    outputs) over the `calibration` feeds: its largest finite |x| on any feed, and finite only
    where it was finite on every feed.

    The summaries are computed inside the graph (`stats_graph`), so a run returns three numbers
    per tensor and each activation is freed once summarised. Constants (weights and what is
    computed from them alone) are summarised once, in a session of their own; the tensors that
    depend on the inputs once per feed, `chunk` of them per session (None: all in one).
    `folder` holds `model`'s external weights, ONNX Runtime reads them there; None when `model`
    holds its weights in memory. ORT's graph optimisations are off so the tensors are the
    graph's own.
    """
    variable = input_dependent(model.graph)
    tensors = [i.name for i in model.graph.input] + [t.name for t in model.graph.initializer]
    tensors = list(dict.fromkeys(tensors + [o for n in model.graph.node for o in n.output if o]))
    constant = [n for n in tensors if n not in variable]
    varying = [n for n in tensors if n in variable]
    step = chunk or len(varying) or 1
    merged: dict[str, TensorStats] = {}
    with weights_on_disk(model, folder) as base:
        if constant:
            summary = stats_graph(constant_graph(model, variable), constant)
            session = _stats_session(summary, base, providers, constant=True)
            _merge_stats(merged, constant, session.run(None, {}))
            del session
        for start in range(0, len(varying), step):
            part = varying[start : start + step]
            session = _stats_session(stats_graph(model, part), base, providers)
            for feeds in calibration:
                _merge_stats(merged, part, session.run(None, dict(feeds)))
            del session
    return merged


def _merge_stats(
    merged: dict[str, TensorStats], names: Sequence[str], values: Sequence[np.ndarray]
) -> None:
    """Fold one run's [peak, nonfinite, kind] rows (see `stats_graph`) into `merged`."""
    for name, (peak, nonfinite, kind) in zip(names, values, strict=True):
        if kind != 0.5:  # not a floating-point tensor
            continue
        old = merged.get(name, TensorStats(0.0, True))
        finite = old.finite and not np.isnan(nonfinite)
        merged[name] = TensorStats(max(old.peak, float(peak)), finite)


def input_dependent(graph: onnx.GraphProto) -> set[str]:
    """Names of the graph inputs and of the tensors computed from one. Follows readers, not
    the node order: graph passes leave nodes out of topological order, which ORT accepts."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in _read_names(node):
            readers.setdefault(name, []).append(node)
    variable = {i.name for i in graph.input}
    frontier = list(variable)
    while frontier:
        for node in readers.get(frontier.pop(), []):
            new = [o for o in node.output if o and o not in variable]
            variable.update(new)
            frontier.extend(new)
    return variable


def constant_graph(model: onnx.ModelProto, variable: set[str]) -> onnx.ModelProto:
    """A copy of `model` holding only the nodes that read no graph input (none of whose
    outputs is `variable`), and no inputs; weights stay where they are."""
    constants = onnx.ModelProto()
    constants.CopyFrom(model)
    graph = constants.graph
    kept = [n for n in graph.node if not variable.intersection(n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.input[:]
    return constants


STATS = "sdrt_stats/"  # prefix of the names `stats_graph` adds


def stats_graph(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` (weights stay where they are) whose outputs are, for each tensor in
    `names`, [largest finite |x| (0 when none), NaN if any x is inf or nan else 0, 0.5 if the
    tensor is floating point else 0 or 1]. Types are probed in the graph (CastLike of 0.5)
    because the exporter leaves many intermediate types unstated.

    Node order matters to memory: `_stats_session` runs, of the nodes ready, the one listed
    first. Each summary follows the node making its tensor (graph inputs' come first), so a
    tensor is summarised as soon as it exists; nodes computing from weights alone (a
    transposed or cast weight) go last, so each runs only when the node reading it is next.
    In ORT's default order a weight's copy can be made at the start and held to the end.
    """
    summary = onnx.ModelProto()
    summary.CopyFrom(model)
    graph = summary.graph
    del graph.output[:]
    constants = {
        "zero": np.zeros(1, np.float32),
        "half": np.full(1, 0.5, np.float32),
        "flat": np.array([-1], np.int64),
    }
    graph.initializer.extend(
        onnx.numpy_helper.from_array(v, STATS + k) for k, v in constants.items()
    )
    summaries = {name: _summary_nodes(name, f"{STATS}{i}/") for i, name in enumerate(names)}
    made = {o for n in graph.node for o in n.output}
    variable = input_dependent(graph)

    def followed(node: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [node, *(n for o in node.output if o in summaries for n in summaries[o])]

    early = [n for n in graph.node if variable.intersection(n.output)]
    late = [n for n in graph.node if not variable.intersection(n.output)]
    nodes = [n for name in names if name not in made for n in summaries[name]]
    nodes += [n for node in early + late for n in followed(node)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.output.extend(
        onnx.helper.make_tensor_value_info(summaries[name][-1].output[0], TensorProto.FLOAT, [3])
        for name in names
    )
    return summary


def _summary_nodes(name: str, prefix: str) -> list[onnx.NodeProto]:
    """The nodes summarising tensor `name` into one [3] float tensor (see `stats_graph`)."""
    nodes: list[onnx.NodeProto] = []
    zero, half, flat = (STATS + k for k in ("zero", "half", "flat"))

    def op(op_type: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(onnx.helper.make_node(op_type, inputs, [prefix + out], prefix + out, **attrs))
        return prefix + out

    values = op("Reshape", [op("Cast", [name], "float", to=TensorProto.FLOAT), flat], "flat")
    size = op("Abs", [values], "abs")
    nan_where_nonfinite = op("Sub", [size, size], "diff")  # inf - inf is nan
    finite = op("Where", [op("IsNaN", [nan_where_nonfinite], "bad"), zero, size], "finite")
    peak = op("ReduceMax", [op("Concat", [finite, zero], "padded", axis=0)], "peak")
    nonfinite = op("ReduceSum", [nan_where_nonfinite], "nonfinite", keepdims=1)
    kind = op("Cast", [op("CastLike", [half, name], "probe")], "kind", to=TensorProto.FLOAT)
    op("Concat", [peak, nonfinite, kind], "stats", axis=0)
    return nodes


def _stats_session(
    graph: onnx.ModelProto, folder: Path, providers: Sequence[str], constant: bool = False
) -> Any:
    """An ORT session on `graph`, saved in `folder` beside the weights it points at: no graph
    optimisation, no prepacked copy of the weights (it runs a few times only) and no memory
    arena, which grows in powers of two and keeps what it took (SD 1.5's fused U-Net, three
    calibration inputs: 8.4 GiB with it, 6.1 without). A graph of inputs' tensors runs in
    priority order (see `stats_graph`); the `constant` graph, which summarises the weights
    once, in ORT's default order, which measured lower on it (4.2 against 6.0 GiB)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not constant:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    path = folder / "sdrt-stats.onnx"
    onnx.save_model(graph, str(path))
    try:
        return ort.InferenceSession(str(path), options, providers=measuring_providers(providers))
    finally:
        path.unlink()


def measuring_providers(providers: Sequence[str]) -> list[Any]:
    """`providers` as a measuring session takes them: the CUDA provider with cuDNN's heuristic
    algorithm choice, since its default exhaustive search times every convolution algorithm
    again in each new session, and a measurement runs each session a few times only."""
    from sdrt.backends.onnxruntime import CudaOptions, session_providers

    return session_providers(providers, CudaOptions(cudnn_conv_algo_search="HEURISTIC"))


def overflow_nodes(
    model: onnx.ModelProto, stats: Mapping[str, TensorStats], limit: float
) -> set[int]:
    """Indices of the nodes that produce or consume a tensor whose fp32 values exceed `limit`.

    Both ends must stay fp32: the value itself does not fit fp16, so neither the node making it
    nor the one reading it may hold it in fp16 (`convert_fp16` keeps the edge between two such
    nodes fp32 too). Infinities are not counted: fp16 represents them (attention masks use them).
    """
    too_big = {name for name, s in stats.items() if s.peak > limit}
    return {
        i
        for i, node in enumerate(model.graph.node)
        if too_big.intersection(node.input) or too_big.intersection(node.output)
    }


def nonfinite_origins(
    fp16_model: onnx.ModelProto,
    fp16_stats: Mapping[str, TensorStats],
    fp32_stats: Mapping[str, TensorStats],
    original_names: Iterable[str],
) -> set[str]:
    """Original node names where fp16 execution first turns finite values into inf/nan.

    A node is an origin when one of its outputs is non-finite in fp16 but finite in fp32 while
    all its floating inputs are finite in fp16. Casts the converter inserted are charged to the
    original nodes on either side of them, since the value they carry does not fit fp16.
    """
    original = set(original_names)
    nodes = list(fp16_model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def nonfinite(name: str) -> bool:
        return name in fp16_stats and not fp16_stats[name].finite

    def was_finite(name: str) -> bool:
        return name not in fp32_stats or fp32_stats[name].finite

    def charged(node: onnx.NodeProto, seen: set[str]) -> set[str]:
        if node.name in original:
            return {node.name}
        if node.name in seen:
            return set()
        seen.add(node.name)
        neighbours = [producer[i] for i in node.input if i in producer]
        neighbours += [c for o in node.output for c in consumers.get(o, [])]
        return set().union(*(charged(n, seen) for n in neighbours))

    origins: set[str] = set()
    for node in nodes:
        broke = any(nonfinite(o) and was_finite(o) for o in node.output)
        if broke and not any(nonfinite(i) for i in node.input):
            origins |= charged(node, set())
    return origins


def keep_fp32_nodes(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    range_fraction: float = 0.25,
    providers: Sequence[str] = CPU,
    rounds: int = 2,
    chunk: int | None = None,
    always: Iterable[str] = (),
    folder: Path | None = None,
) -> list[str]:
    """Names of the nodes to leave in fp32 when converting `model` (fp32) to fp16.

    `feeds` is one set of inputs or several (calibration: prompts, timesteps); a tensor's
    range is its largest over them. Always the timestep embedding (`timestep_embedding_nodes`)
    and the `always` nodes. Then by range: any node touching a tensor whose fp32 values exceed
    `range_fraction` * 65504 (calibration inputs do not show the worst case, hence the margin).
    Then up to `rounds` times: convert, run in fp16, and add the nodes where inf/nan first
    appear (values that fit fp16 but whose fp16 rounding breaks a later node, e.g. a divisor
    that underflows to 0). ORT's CPU provider computes many fp16 ops in fp32, so on the CPU
    that check sees the conversions' own roundings; the CUDA provider sees the kernels' too.

    `folder`: where `model`'s external weights lie (each round's fp16 weights are written
    there and removed after it); None when `model` holds its weights in memory.
    """
    calibration = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    stats = calibration_stats(model, calibration, providers, chunk, folder)
    nodes = list(model.graph.node)
    keep = {nodes[i].name for i in overflow_nodes(model, stats, FP16_MAX * range_fraction)}
    keep |= timestep_embedding_nodes(model) | set(always)
    for _ in range(rounds):
        if "" in keep:
            break
        with _round_weights(folder) as weights:
            fp16 = convert_fp16(model, sorted(keep), folder, weights)
            fp16_stats = calibration_stats(fp16, calibration, providers, chunk, folder)
        found = nonfinite_origins(fp16, fp16_stats, stats, {n.name for n in nodes})
        if found <= keep:
            break
        keep |= found
    if "" in keep:
        unnamed = [f"#{i} ({n.op_type})" for i, n in enumerate(nodes) if not n.name]
        raise ValueError(
            f"some of the unnamed nodes {', '.join(unnamed[:5])} must stay fp32, but the fp16 "
            "converter blocks nodes by name; name every node of the graph first"
        )
    return sorted(keep)


@contextmanager
def _round_weights(folder: Path | None) -> Iterator[str | None]:
    """File name for one measuring round's fp16 weights in `folder`, removed after it."""
    if folder is None:
        yield None
        return
    name = "sdrt-fp16-round.data"
    try:
        yield name
    finally:
        (folder / name).unlink(missing_ok=True)


def timestep_embedding_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes computing the sinusoidal embedding of `EMBEDDED_INPUTS`, up to the
    first Linear they enter, with the constants they read (the frequencies).

    In fp16, t * frequency for t near 1000 is off by up to 0.5 before Sin/Cos, which then
    return another angle: diffusers keeps this chain fp32 on purpose, and so do we.
    """
    graph = model.graph
    seeds = {i.name for i in graph.input} & set(EMBEDDED_INPUTS)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in _read_names(node):
            readers.setdefault(name, []).append(node)
    chain: dict[str, onnx.NodeProto] = {}
    frontier = list(seeds)
    while frontier:
        for node in readers.get(frontier.pop(), []):
            if node.op_type in LINEAR_OPS or node.name in chain:
                continue
            chain[node.name] = node
            frontier.extend(o for o in node.output if o)
    return set(chain) | constant_ancestors(graph, list(chain.values()))


def constant_ancestors(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Names of the nodes feeding `nodes` that read no graph input: constants and what is
    computed from constants alone (e.g. an Exp of the frequencies, where not folded)."""
    producer = {o: n for n in graph.node for o in n.output if o}
    variable = input_dependent(graph)
    found: set[str] = set()
    frontier = [producer[i] for n in nodes for i in n.input if i in producer]
    while frontier:
        node = frontier.pop()
        if node.name in found or variable.intersection(node.output):
            continue
        found.add(node.name)
        frontier.extend(producer[i] for i in node.input if i in producer)
    return found


def convert_fp16(
    model: onnx.ModelProto,
    keep_fp32: Sequence[str] = (),
    folder: Path | None = None,
    weights: str | None = None,
    encode: Callable[[np.ndarray], bytes] | None = None,
) -> onnx.ModelProto:
    """fp16 copy of `model` with float32 inputs/outputs and the `keep_fp32` nodes in fp32.

    Wraps onnxruntime's convert_float_to_float16, fixing two things it leaves: it casts every
    edge to fp16, even between two kept nodes (an out-of-range value then overflows anyway),
    and it appends the casts it inserts out of topological order. That converter only retypes
    weights held in files; those are converted here, a tensor at a time, into the file
    `weights` in `folder` (where `model`'s external weights lie), by `encode` (default fp16;
    `bfloat16.convert_bf16` passes bf16's).
    """
    from onnxruntime.transformers import float16

    typed = with_value_types(model)
    was_float = {t.name for t in external_tensors(typed) if t.data_type == TensorProto.FLOAT}
    # It reads each converted weight whole only for its shape, which weights in files cannot
    # give (read relative to the working directory, as fp16); their dims say the same.
    with mock.patch.object(float16, "make_value_info_from_tensor", _value_info_of):
        converted = float16.convert_float_to_float16(
            typed, keep_io_types=True, disable_shape_infer=True, node_block_list=list(keep_fp32)
        )
    retyped = [
        t
        for t in external_tensors(converted)
        if t.name in was_float and t.data_type == TensorProto.FLOAT16
    ]
    if retyped:
        if folder is None or weights is None:
            raise ValueError("the model's weights lie in files: pass the folder and a file name")
        _external_to_fp16(retyped, folder, weights, encode)
    remove_fp16_round_trips(converted)
    sort_topologically(converted.graph)
    return converted


def _value_info_of(tensor: TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def _external_to_fp16(
    tensors: Sequence[TensorProto],
    folder: Path,
    weights: str,
    encode: Callable[[np.ndarray], bytes] | None,
) -> None:
    """Write fp16 copies of fp32 `tensors` (in files under `folder`) to `folder`/`weights`,
    rounded as the converter rounds weights in memory (or by `encode`), and point the tensors
    at them."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    with (folder / weights).open("wb") as out:
        for tensor in tensors:
            values = np.frombuffer(read_external(tensor, folder), np.float32)
            half = encode(values) if encode else convert_np_to_float16(values).tobytes()
            point_at(tensor, weights, pad_to_page(out), len(half))
            out.write(half)


def with_value_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose intermediate tensors carry their element types, which the fp16
    converter needs to place casts around kept nodes. Inference runs on a weight-free skeleton
    (initializers as typed inputs), so it also works past protobuf's 2 GB limit."""
    graph = model.graph
    skeleton = onnx.helper.make_model(
        onnx.helper.make_graph(
            list(graph.node),
            graph.name,
            [
                *graph.input,
                *(
                    onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                    for t in graph.initializer
                    if t.name not in {i.name for i in graph.input}
                ),
            ],
            list(graph.output),
            value_info=list(graph.value_info),
        ),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        functions=list(model.functions),
    )
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    known = {v.name for v in typed.graph.value_info}
    typed.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
    return typed


def remove_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Bypass Cast(fp32->fp16) -> Cast(fp16->fp32) pairs so their readers see the fp32 value;
    returns how many were bypassed. Only adds precision: it removes a rounding step."""
    graph = model.graph
    by_output = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    renamed: dict[str, str] = {}
    dropped = []
    for node in graph.node:
        first = by_output.get(node.input[0]) if node.input else None
        if (
            cast_to(node) == TensorProto.FLOAT
            and first is not None
            and cast_to(first) == TensorProto.FLOAT16
            and elem_type(model, first.input[0]) == TensorProto.FLOAT
        ):
            if node.output[0] in graph_outputs:
                node.input[0] = first.input[0]  # stays as an fp32 -> fp32 no-op cast
            else:
                renamed[node.output[0]] = first.input[0]
                dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    used = {i for n in graph.node for i in n.input} | graph_outputs
    dead = [
        n
        for n in graph.node
        if cast_to(n) == TensorProto.FLOAT16 and not used.intersection(n.output)
    ]
    for node in dead:
        graph.node.remove(node)
    live = used | {i.name for i in graph.input}
    stale = [v for v in graph.value_info if v.name not in live]
    for value in stale:
        graph.value_info.remove(value)
    return len(renamed)


def elem_type(model: onnx.ModelProto, name: str) -> int | None:
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if value.name == name:
            return value.type.tensor_type.elem_type
    for init in model.graph.initializer:
        if init.name == name:
            return init.data_type
    return None


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its inputs' producers, as the ONNX spec requires;
    nodes already in order keep their relative order."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    waiting = []
    for i, node in enumerate(nodes):
        # Names a subgraph reads from the outer scope count as inputs of its node.
        sources = {producer[name] for name in _read_names(node) if name in producer} - {i}
        waiting.append(len(sources))
        for source in sources:
            readers[source].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for reader in readers[i]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(nodes):
        raise ValueError(f"graph {graph.name!r} has a cycle; its nodes cannot be ordered")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _read_names(node: onnx.NodeProto) -> set[str]:
    names = set(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            names |= {i for n in sub.node for i in _read_names(n)}
    return names


# ---------------------------------------------------------------------------------------------
# Static-shape variants


def fix_dims(model: onnx.ModelProto, dims: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of `model` with its named dimensions set to `dims` (extra names are ignored).

    With every input size known, ORT folds the Shape/Gather/Concat arithmetic at load time, so
    no node falls back to the CPU and the CUDA provider can capture the run as a CUDA graph.
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    missing: set[str] = set()
    for value in (*fixed.graph.input, *fixed.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                if dim.dim_param not in dims:
                    missing.add(dim.dim_param)
                    continue
                size = int(dims[dim.dim_param])
                dim.Clear()
                dim.dim_value = size
    if missing:
        raise ValueError(
            f"no size given for {', '.join(sorted(missing))}; pass every named dimension of "
            "the graph's inputs and outputs in dims"
        )
    # The exporter's intermediate shapes name dims of their own; infer them again from the
    # now-static inputs. ORT's inference knows the com.microsoft ops, onnx's does not.
    del fixed.graph.value_info[:]
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(fixed, auto_merge=False)
    except Exception:  # noqa: BLE001 - inference is an aid; ORT infers again at load
        try:
            return onnx.shape_inference.infer_shapes(fixed)
        except Exception:  # noqa: BLE001
            return fixed


def used_dims(model: onnx.ModelProto) -> set[str]:
    """Named dimensions of the graph's inputs and outputs."""
    return {
        d.dim_param
        for v in (*model.graph.input, *model.graph.output)
        for d in v.type.tensor_type.shape.dim
        if d.HasField("dim_param")
    }


def static_variant_file(component: str, dims: Mapping[str, int]) -> str:
    """File name of a static variant: unet.static-latent_height64-latent_width64-unet_batch2.onnx.
    Pass only the dims the component uses (see `used_dims`) so that names stay stable."""
    return f"{component}.static-{'-'.join(f'{k}{dims[k]}' for k in sorted(dims))}.onnx"


def write_static_variant(src: Path, dims: Mapping[str, int], dst: Path) -> dict[str, Any]:
    """Write `src` with `dims` fixed to `dst` and return its manifest entry.

    Where `src` keeps its weights in an external file in the same folder, `dst` is a graph
    alone that points at those same weights: a variant costs kilobytes, not another copy.
    """
    graph = onnx.load_model(src, load_external_data=False)
    locations = {
        e.value
        for t in graph.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    shares = bool(locations) and src.parent.resolve() == dst.parent.resolve()
    model = graph if shares else onnx.load_model(src)
    wanted = {k: int(dims[k]) for k in used_dims(model) if k in dims}
    fixed = fix_dims(model, wanted)
    if shares or fixed.ByteSize() < 2**31 - 2**24:
        onnx.save_model(fixed, dst)
    else:
        onnx.save_model(
            fixed,
            dst,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{dst.name}.data",
            size_threshold=1024,
        )
    data = (
        dst.parent / next(iter(locations))
        if shares and len(locations) == 1
        else dst.with_name(dst.name + ".data")
    )
    data = data if data.exists() else None
    shared = shares and data is not None
    return {
        "file": dst.name,
        "external_data": data.name if data else None,
        # Shared weights are hashed with the component itself; hashing them again per variant
        # would only add seconds to every bundle load.
        "sha256": file_sha256(dst, None if shared else data),
        "shares_external_data": shared,
        "dims": wanted,
    }
