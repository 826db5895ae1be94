"""Trace each Stable Diffusion component to ONNX and check it against PyTorch.

Each component is wrapped so its graph takes and returns plain tensors with stable names; the
runtime and the TensorRT builder read those names from the manifest, never from here.
Dimensions named in a shape are dynamic: batch, latent_height/latent_width (image size / 8) and
height/width (pixels).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx
import torch
from onnx.external_data_helper import load_external_data_for_model

from sdrt.errors import UserError

from .bfloat16 import BF16_TOLERANCE, bf16_keep, convert_bf16, emulated_fp32, is_bf16
from .calibration import attention_score_nodes, calibration_providers, measuring_room
from .cuda_fusions import (
    cuda_only_ops,
    cuda_ops_lowered,
    fuse_for_cuda,
    fused_node_names,
    lower_cuda_ops,
    unfuse_unsupported,
)
from .external_data import (
    external_bytes,
    external_tensors,
    gather_external_data,
    weights_to_disk,
)
from .lazy_weights import is_lazy, weights_while_called
from .optimize import convert_fp16, count_nodes, fused_attention_for_export, keep_fp32_nodes
from .stages import StageFn, no_stages

OPSET = 17
TWO_GB = 2**31
INLINE_LIMIT = TWO_GB - 2**24  # protobuf's limit, less room for the graph itself
# the most weight bytes a graph pass writes back inline, as the exporter writes small graphs:
# protobuf builds the whole file in memory, about four copies of the weights
INLINE_WRITE = 2**28
# Relative error (max abs diff / max abs of the reference) above which export fails.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": BF16_TOLERANCE}


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: list[int | str]  # ints are fixed, strings name a dynamic dimension


@dataclass
class Component:
    """A traceable module with its I/O contract and a way to make sample inputs of any size."""

    name: str
    module: torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, int] = field(default_factory=dict)  # sizes of the named dims for tracing
    # for the fp16 policy: inputs like deployment's (see calibration.py; default: sample
    # inputs at the trace size), and whether attention scores must stay fp32 (SD 2.x)
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)
    upcast_attention: bool = False
    # entered around tracing: swaps in exporter-friendly code where a model's traces badly
    tracing: Callable[[], AbstractContextManager[object]] = nullcontext

    def sample_inputs(self, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.inputs:
            shape = [d if isinstance(d, int) else dims[d] for d in spec.shape]
            if spec.dtype.startswith("int"):
                # token ids, or rows of the LoRA banks (lora_branch.py)
                high = dims["lora_bank"] if spec.name == "lora_index" else dims["vocab"]
                feeds[spec.name] = rng.integers(0, high, shape).astype(spec.dtype)
            elif spec.name == "timestep":
                feeds[spec.name] = rng.uniform(0, 999, shape).astype(spec.dtype)
            elif spec.name.startswith("lora_"):  # small, as trained adapters are
                feeds[spec.name] = 0.05 * rng.standard_normal(shape).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return feeds


class _TextEncoder(torch.nn.Module):
    """Hidden states the U-Net attends to (SDXL: the penultimate layer), plus SDXL's pooled
    projection when the encoder has one."""

    def __init__(self, text_encoder: torch.nn.Module, penultimate: bool) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.penultimate = penultimate

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.text_encoder(input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        pooled = getattr(out, "text_embeds", None)
        return hidden if pooled is None else (hidden, pooled)


class _UNet(torch.nn.Module):
    """Positional graph inputs; the optional ones (SDXL's added conditions, LCM's guidance
    embedding) are named in `extra` so the ONNX input order is the manifest's order."""

    def __init__(self, unet: torch.nn.Module, extra: list[str]) -> None:
        super().__init__()
        self.unet = unet
        self.extra = extra

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *extra: torch.Tensor,
    ) -> torch.Tensor:
        named = dict(zip(self.extra, extra, strict=True))
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=named.get("timestep_cond"),
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    """Returns the latent distribution's moments so the runtime draws the sample itself."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(image)
        return self.vae.quant_conv(moments) if self.vae.quant_conv is not None else moments


def components(pipe: Any) -> list[Component]:
    """The graphs of a Stable Diffusion pipeline with their I/O contracts."""
    latent_ch = pipe.unet.config.in_channels
    vae_ch = pipe.vae.config.latent_channels
    max_len = pipe.tokenizer.model_max_length
    latent = ["batch", vae_ch, "latent_height", "latent_width"]
    image = ["batch", 3, "height", "width"]
    unet_batch = ["unet_batch", latent_ch, "latent_height", "latent_width"]
    encoders = text_encoders(pipe)
    unet_inputs = [
        TensorSpec("sample", "float32", unet_batch),
        TensorSpec("timestep", "float32", ["unet_batch"]),
        TensorSpec(
            "encoder_hidden_states",
            "float32",
            ["unet_batch", max_len, pipe.unet.config.cross_attention_dim],
        ),
    ]
    if len(encoders) == 2:  # SDXL: pooled text embedding and size/crop conditioning
        pooled_dim = pipe.text_encoder_2.config.projection_dim
        unet_inputs += [
            TensorSpec("text_embeds", "float32", ["unet_batch", pooled_dim]),
            TensorSpec("time_ids", "float32", ["unet_batch", 6]),
        ]
    if pipe.unet.config.time_cond_proj_dim:  # guidance-distilled (LCM): scale as an input
        unet_inputs.append(
            TensorSpec(
                "timestep_cond", "float32", ["unet_batch", pipe.unet.config.time_cond_proj_dim]
            )
        )
    return [
        *encoders,
        Component(
            "unet",
            _UNet(pipe.unet, [s.name for s in unet_inputs[3:]]),
            unet_inputs,
            [
                TensorSpec(
                    "noise_pred",
                    "float32",
                    ["unet_batch", pipe.unet.config.out_channels, "latent_height", "latent_width"],
                )
            ],
            upcast_attention=bool(getattr(pipe.unet.config, "upcast_attention", False)),
        ),
        Component(
            "vae_decoder",
            _VaeDecoder(pipe.vae),
            [TensorSpec("latent", "float32", latent)],
            [TensorSpec("image", "float32", image)],
        ),
        Component(
            "vae_encoder",
            _VaeEncoder(pipe.vae),
            [TensorSpec("image", "float32", image)],
            [
                TensorSpec(
                    "latent_moments",
                    "float32",
                    ["batch", 2 * vae_ch, "latent_height", "latent_width"],
                )
            ],
        ),
    ]


def text_encoders(pipe: Any) -> list[Component]:
    """One text encoder (SD 1/2: last hidden state) or two (SDXL: penultimate + pooled)."""
    max_len = pipe.tokenizer.model_max_length
    second = getattr(pipe, "text_encoder_2", None)
    found = []
    for name, encoder in (("text_encoder", pipe.text_encoder), ("text_encoder_2", second)):
        if encoder is None:
            continue
        outputs = [
            TensorSpec("text_embeddings", "float32", ["batch", max_len, encoder.config.hidden_size])
        ]
        if hasattr(encoder, "text_projection"):
            outputs.append(
                TensorSpec("pooled_embeddings", "float32", ["batch", encoder.config.projection_dim])
            )
        found.append(
            Component(
                name,
                _TextEncoder(encoder, penultimate=second is not None),
                [TensorSpec("input_ids", "int32", ["batch", max_len])],
                outputs,
            )
        )
    return found


def trace_dims(latent_size: int, vocab: int, vae_scale: int) -> dict[str, int]:
    """Sizes used for tracing; verification uses different ones to prove the axes are dynamic."""
    return {
        "batch": 1,
        "unet_batch": 2,
        "latent_height": latent_size,
        "latent_width": latent_size,
        "height": vae_scale * latent_size,
        "width": vae_scale * latent_size,
        "vocab": vocab,
    }


@dataclass
class ExportedOps:
    """What the CUDA fusions left in a written graph: the count of each CUDA-only op, and how
    many fused nodes each reason wrote back as standard ONNX (their CUDA kernels refuse them)."""

    cuda_only: dict[str, int] = field(default_factory=dict)
    unfused: dict[str, int] = field(default_factory=dict)


def export_onnx(
    component: Component,
    dims: dict[str, int],
    path: Path,
    dtype: str,
    fuse_attention: bool = False,
    external_data: bool = False,
    cuda_fusions: bool = False,
    stage: StageFn = no_stages,
    traced: Callable[[], None] | None = None,
) -> ExportedOps:
    """Trace `component` to `path` (plus `path.data` external weights when over 2 GB, or
    always with `external_data`, so static variants can share the weights); returns the
    ONNX Runtime CUDA-only ops in the graph written.

    `fuse_attention` emits com.microsoft MultiHeadAttention (ONNX Runtime only; TensorRT cannot
    parse it); `cuda_fusions` applies ORT CUDA's NHWC and normalisation fusions, on the fp32
    graph. fp16 then keeps in fp32 the nodes whose measured activations leave the fp16 range,
    measured on the fused graph written back as standard ops (`cuda_ops_lowered`); bf16 keeps
    fp32 only what fp16 keeps for precision (`bfloat16.bf16_keep`). `stage` brackets each step
    (trace, fuse, fp16 measure, fp16 or bf16 convert, write); `traced` is called once the
    graph is traced, when export no longer needs the PyTorch weights.

    The graph passes work on a skeleton whose weights lie in files in a temporary folder
    (`external_data.weights_to_disk`): no pass holds a copy of the weights in memory, and ONNX
    Runtime reads them from those files where the fp16 policy is measured.
    """
    feeds = component.sample_inputs(dims)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in component.inputs)
    dynamic_axes = _dynamic_axes(component)
    passes = cuda_fusions or dtype != "fp32"
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp_name:
        tmp = Path(tmp_name)
        traced_file = tmp / "model.onnx"
        with stage("trace"):
            fused = _trace(component, args, traced_file, dynamic_axes, fuse_attention)
            model = onnx.load(str(traced_file), load_external_data=False)
            if passes or external_data:
                weights_to_disk(model, tmp, "sdrt-inline")  # a graph under 2 GB holds them
        if traced:
            traced()
        found = count_nodes(model, "MultiHeadAttention", "com.microsoft")
        if fuse_attention and found != len(fused):
            raise UserError(
                f"{component.name}: attention fusion missed some of its {len(fused)} "
                "attention modules; export without --fused-attention"
            )
        unfused: Counter[str] = Counter()
        if cuda_fusions:
            with stage("fuse"):
                model = fuse_for_cuda(model, tmp)
                unfused.update(unfuse_unsupported(model))
        if dtype == "fp16":
            calibration = component.calibration or [feeds]
            present = {n.name for n in model.graph.node}
            with stage("fp16 measure"), cuda_ops_lowered(model) as standard:
                always = attention_score_nodes(standard) if component.upcast_attention else set()
                measured = keep_fp32_nodes(
                    standard,
                    calibration,
                    providers=calibration_providers(),
                    chunk=stats_chunk(
                        feeds,
                        calibration,
                        len(standard.graph.node),
                        measuring_room(external_bytes(standard)),
                    ),
                    always=always,
                    folder=tmp,
                )
                keep = fused_node_names(measured, present)
            with stage("fp16 convert"):
                model = convert_fp16(model, keep, tmp, "sdrt-fp16.data")
                unfused.update(unfuse_unsupported(model))
        if dtype == "bf16":
            with stage("bf16 convert"):
                model = convert_bf16(
                    model, bf16_keep(model, component.upcast_attention), tmp, "sdrt-bf16.data"
                )
        with stage("write"):
            _write(model, tmp, traced_file, path, external_data, passes)
    return ExportedOps(cuda_only_ops(model), dict(unfused))


def _write(
    model: onnx.ModelProto,
    folder: Path,
    traced: Path,
    path: Path,
    external_data: bool,
    changed: bool,
) -> None:
    """Write `model` (its external weights in `folder`) to `path`: weights streamed into
    `path`.data when asked or over `INLINE_WRITE`, else inline as the exporter writes small
    graphs; `traced`, the exporter's own file, is moved there where no pass `changed` it."""
    big = external_bytes(model) > (INLINE_WRITE if changed else INLINE_LIMIT)
    if external_tensors(model) and (external_data or big):
        gather_external_data(model, folder, path.with_name(f"{path.name}.data"))
        onnx.save_model(model, str(path))
    elif changed or external_tensors(model):
        load_external_data_for_model(model, str(folder))
        save_onnx(model, path)
    else:
        os.replace(traced, path)


def _dynamic_axes(component: Component) -> dict[str, dict[int, str]]:
    return {
        spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
        for spec in component.inputs + component.outputs
    }


def weightless_trace(component: Component) -> Callable[[Path, tuple[torch.Tensor, ...]], None]:
    """The exporter run for a component whose weights stay on disk (`streamed_export`): its
    weights become graph inputs named after the parameters, and nothing is folded into them."""

    def trace(out: Path, args: tuple[torch.Tensor, ...]) -> None:
        # The legacy exporter (torch 2.13) hands every weight's value to its ONNX shape
        # inference, which copies the placeholders out at full size (CLIP-G: 2.9 GiB peak
        # against 0.55 without); the weight inputs' types and shapes say all it needs.
        infer = torch._C._jit_pass_onnx_graph_shape_type_inference
        with mock.patch.object(
            torch._C,
            "_jit_pass_onnx_graph_shape_type_inference",
            lambda graph, params, opset: infer(graph, {}, opset),
        ):
            _trace(component, args, out, _dynamic_axes(component), False, weights=False)

    return trace


def _trace(
    component: Component,
    args: tuple[torch.Tensor, ...],
    out: Path,
    dynamic_axes: dict[str, dict[int, str]],
    fuse_attention: bool,
    weights: bool = True,
) -> list[str]:
    """torch.onnx.export (legacy exporter) of `component` to `out`; returns the names of the
    attention modules emitted as MultiHeadAttention. `weights` False leaves the weights out
    (as graph inputs) and folds no constants into them."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, OPSET)
    fusing = fused_attention_for_export(component.module) if fuse_attention else nullcontext()
    with warnings.catch_warnings(), torch.no_grad(), component.tracing(), fusing as fused:
        warnings.simplefilter("ignore")  # tracer warnings about python-side shape checks
        torch.onnx.export(
            component.module.eval(),
            args,
            str(out),
            input_names=[s.name for s in component.inputs],
            output_names=[s.name for s in component.outputs],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=weights,
            export_params=weights,
            dynamo=False,
        )
    return list(fused or [])


@torch.onnx.symbolic_helper.parse_args("v", "is", "v", "f")
def _rms_norm(g: Any, x: Any, shape: list[int], weight: Any, eps: float) -> Any:
    """torch.nn.RMSNorm (Flux's q/k norms) as opset-17 ops: opset 17 has no RMSNormalization
    and the legacy exporter no symbolic for it. x * 1/sqrt(mean(x^2) + eps) * weight."""
    axes = list(range(-len(shape), 0))
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    eps_const = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
    normed = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, eps_const)))
    if torch.onnx.symbolic_helper._is_none(weight):
        return normed
    return g.op("Mul", normed, weight)


def stats_chunk(
    traced: dict[str, np.ndarray],
    calibration: list[dict[str, np.ndarray]],
    nodes: int,
    room: float = 1.0,
) -> int | None:
    """Tensors summarised per measuring session: all of a graph of `nodes` nodes (None) while
    the working memory, in proportion to the inputs' size, fits `room` times what it is at the
    trace size (`calibration.measuring_room`); else a share, so that it does. Each session runs
    the whole graph (and on the CUDA provider repeats cuDNN's algorithm search), so the fewer
    the better: the device's memory, not the host's RAM, sizes them there."""
    largest = max(sum(v.size for v in feeds.values()) for feeds in calibration)
    share = room * sum(v.size for v in traced.values()) / largest
    return None if share >= 1 else max(16, int(nodes * share))


def save_onnx(model: onnx.ModelProto, path: Path, external_data: bool = False) -> None:
    too_big = model.ByteSize() > INLINE_LIMIT if _fits_bytesize(model) else True
    external = external_data or too_big
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )


def _fits_bytesize(model: onnx.ModelProto) -> bool:
    """ByteSize() itself fails on protos past protobuf's 2 GB limit."""
    from google.protobuf.message import EncodeError

    try:
        model.ByteSize()
    except (ValueError, EncodeError):
        return False
    return True


def lean_session_options(ort: Any) -> Any:
    """A verifying session runs once: no arena kept past the run and no prepacked (copied)
    weights; the kernels and their numerics are the same."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def reference_outputs(component: Component, dims: dict[str, int]) -> list[np.ndarray]:
    """PyTorch's outputs on the verification inputs; computed before export so that the
    PyTorch weights can be freed once traced."""
    feeds = component.sample_inputs(dims, seed=1)
    lazy = weights_while_called(component.module) if is_lazy(component.module) else nullcontext()
    with torch.no_grad(), lazy:
        want = component.module(*(torch.from_numpy(feeds[s.name]) for s in component.inputs))
    return [w.numpy() for w in ([want] if isinstance(want, torch.Tensor) else want)]


def verify_onnx(
    component: Component, path: Path, dims: dict[str, int], want: list[np.ndarray]
) -> dict[str, float]:
    """Run the ONNX file on ONNX Runtime's CPU provider and compare with PyTorch's outputs
    `want` (`reference_outputs`); CUDA-only ops are run as their standard-ONNX lowering (see
    `cuda_fusions`) and a bf16 graph as its fp32 emulation (`bfloat16.emulated_fp32`), each
    written beside `path` so that it reads the same weight file."""
    import onnxruntime as ort

    feeds = component.sample_inputs(dims, seed=1)
    graph = onnx.load(str(path), load_external_data=False)
    runnable = path.with_name(f".runnable-{path.name}")
    data = f"{runnable.name}.data"
    try:
        if cuda_only_ops(graph):
            save_onnx(lower_cuda_ops(graph), runnable)
        elif is_bf16(graph):
            onnx.save_model(emulated_fp32(graph, path.parent, data), str(runnable))
        else:
            runnable = path
        session = ort.InferenceSession(
            str(runnable), lean_session_options(ort), providers=["CPUExecutionProvider"]
        )
        got = session.run(None, feeds)
        del session
    finally:
        if runnable != path:
            runnable.unlink(missing_ok=True)
            runnable.with_name(data).unlink(missing_ok=True)
    return compare(got, want)


def compare(got: list[np.ndarray], want: list[np.ndarray]) -> dict[str, float]:
    """Largest absolute difference, relative to the reference's largest value, and whether
    every output is finite."""
    max_abs = max_ref = 0.0
    for g, w in zip(got, want, strict=True):
        w64 = w.astype(np.float64)
        max_abs = max(max_abs, float(np.abs(g.astype(np.float64) - w64).max()))
        max_ref = max(max_ref, float(np.abs(w64).max()))
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / max(max_ref, 1e-12),
        "finite": all(bool(np.isfinite(g).all()) for g in got),
    }
