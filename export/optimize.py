"""Make exported graphs fast on ONNX Runtime CUDA without changing what they compute.

Three levers, each checked on ORT CPU: attention emitted as one com.microsoft MultiHeadAttention
node per attention module, an fp16 policy measured from the model's own activations, and
static-shape copies of a graph so ORT can fold its shape arithmetic and capture a CUDA graph.
"""

from __future__ import annotations

import heapq
import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto
from onnx.external_data_helper import load_external_data_for_model

from sdrt.bundle import file_sha256

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
CPU = ("CPUExecutionProvider",)
# Graph inputs whose sinusoidal embedding diffusers computes in fp32 (`get_timestep_embedding`,
# then `.to(sample.dtype)` before the first Linear): the U-Net's timestep and SDXL's time_ids.
EMBEDDED_INPUTS = ("timestep", "time_ids")
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


def tensor_stats(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    providers: Sequence[str] = CPU,
    chunk: int = 512,
) -> dict[str, TensorStats]:
    """Summarise every floating-point tensor of `model` on `feeds`: graph inputs, initializers
    and each node output. Intermediate outputs are exposed `chunk` at a time, trading runs for
    memory; ORT's graph optimisations are off so the tensors are the graph's own."""
    stats = {name: summarise(np.asarray(v)) for name, v in feeds.items()}
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            stats[init.name] = summarise(onnx.numpy_helper.to_array(init))
    produced = list(dict.fromkeys(o for n in model.graph.node for o in n.output if o))
    with tempfile.TemporaryDirectory() as tmp:
        # Weights go to one external file once; each chunk is a small graph proto pointing at
        # it. Saving that way strips `model` of its weights (a copy would double gigabytes);
        # they are read back into it at the end.
        base = Path(tmp) / "model.onnx"
        onnx.save_model(
            model, base, save_as_external_data=True, location="model.onnx.data", size_threshold=0
        )
        try:
            skeleton = onnx.load_model(base, load_external_data=False)
            for start in range(0, len(produced), chunk):
                names = produced[start : start + chunk]
                stats |= _output_stats(skeleton, names, feeds, Path(tmp), providers)
        finally:
            load_external_data_for_model(model, tmp)
    return stats


def _output_stats(
    skeleton: onnx.ModelProto,
    names: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    folder: Path,
    providers: Sequence[str],
) -> dict[str, TensorStats]:
    """Stats of the graph outputs and of `names`, exposed as extra outputs of `skeleton`
    (whose weights lie in `folder`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    graph = onnx.ModelProto()
    graph.CopyFrom(skeleton)  # a skeleton: no weights in it
    declared = [o.name for o in graph.graph.output]
    extra = [n for n in names if n not in declared]
    graph.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
    path = folder / "chunk.onnx"
    onnx.save_model(graph, path)
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    wanted = declared + extra
    values = session.run(wanted, dict(feeds))
    return {
        name: summarise(value)
        for name, value in zip(wanted, values, strict=True)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f"
    }


def summarise(values: np.ndarray) -> TensorStats:
    if values.dtype.kind != "f" or values.size == 0:
        return TensorStats(0.0, True)
    finite = np.isfinite(values)
    magnitudes = np.abs(values[finite]) if not finite.all() else np.abs(values)
    return TensorStats(float(magnitudes.max()) if magnitudes.size else 0.0, bool(finite.all()))


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


def calibration_stats(
    model: onnx.ModelProto,
    calibration: Sequence[Mapping[str, np.ndarray]],
    providers: Sequence[str],
    chunk: int,
) -> dict[str, TensorStats]:
    """`tensor_stats` over several calibration feeds: each tensor's largest peak, and finite
    only where it was finite on every feed."""
    merged: dict[str, TensorStats] = {}
    for feeds in calibration:
        for name, s in tensor_stats(model, feeds, providers, chunk).items():
            old = merged.get(name, s)
            merged[name] = TensorStats(max(old.peak, s.peak), old.finite and s.finite)
    return merged


def keep_fp32_nodes(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    range_fraction: float = 0.25,
    providers: Sequence[str] = CPU,
    rounds: int = 2,
    chunk: int = 512,
    always: Iterable[str] = (),
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
    """
    calibration = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    stats = calibration_stats(model, calibration, providers, chunk)
    nodes = list(model.graph.node)
    keep = {nodes[i].name for i in overflow_nodes(model, stats, FP16_MAX * range_fraction)}
    keep |= timestep_embedding_nodes(model) | set(always)
    for _ in range(rounds):
        if "" in keep:
            break
        fp16 = convert_fp16(model, sorted(keep))
        fp16_stats = calibration_stats(fp16, calibration, providers, chunk)
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
    variable = {i.name for i in graph.input}  # tensors that depend on a graph input
    for node in graph.node:  # in topological order, as the ONNX spec requires
        if variable.intersection(_read_names(node)):
            variable.update(node.output)
    found: set[str] = set()
    frontier = [producer[i] for n in nodes for i in n.input if i in producer]
    while frontier:
        node = frontier.pop()
        if node.name in found or variable.intersection(node.output):
            continue
        found.add(node.name)
        frontier.extend(producer[i] for i in node.input if i in producer)
    return found


def convert_fp16(model: onnx.ModelProto, keep_fp32: Sequence[str] = ()) -> onnx.ModelProto:
    """fp16 copy of `model` with float32 inputs/outputs and the `keep_fp32` nodes in fp32.

    Wraps onnxruntime's convert_float_to_float16, fixing two things it leaves: it casts every
    edge to fp16, even between two kept nodes (an out-of-range value then overflows anyway),
    and it appends the casts it inserts out of topological order.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    typed = with_value_types(model)
    converted = convert_float_to_float16(
        typed, keep_io_types=True, disable_shape_infer=True, node_block_list=list(keep_fp32)
    )
    remove_fp16_round_trips(converted)
    sort_topologically(converted.graph)
    return converted


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
