"""ONNX Runtime CUDA fusions: each contrib op's lowering against a PyTorch reference, the fusion
pass on the tiny U-Net and VAE, and the bundles it produces."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from sdrt import Pipeline
from sdrt.errors import UserError
from sdrt.export import bundle_writer
from sdrt.export.cuda_fusions import (
    CUDA_ONLY_OPS,
    cuda_only_ops,
    cuda_ops_lowered,
    fuse_for_cuda,
    fused_node_names,
    lower_cuda_ops,
    unfuse_unsupported,
)
from sdrt.export.onnx_export import components, export_onnx, trace_dims

RNG = np.random.default_rng(0)
CPU = ["CPUExecutionProvider"]


def run_lowered(
    op: str,
    inputs: dict[str, np.ndarray],
    constants: dict[str, np.ndarray],
    n_outputs: int = 1,
    **attrs: object,
) -> list[np.ndarray]:
    """Build a one-node com.microsoft graph, lower it, run it on ORT CPU."""
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(
        op, [*inputs, *constants], outputs, name="fused", domain="com.microsoft", **attrs
    )
    dtype = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
    first = dtype[next(iter(inputs.values())).dtype.type]  # every output has the input's type
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(k, dtype[v.dtype.type], v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, first, None) for o in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    lowered = lower_cuda_ops(model)
    assert cuda_only_ops(lowered) == {}
    assert all(n.name.startswith("fused/lowered/") for n in lowered.graph.node)
    session = ort.InferenceSession(lowered.SerializeToString(), providers=CPU)
    return session.run(None, inputs)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("activation", [0, 1])
def test_group_norm_lowering_matches_torch_in_nhwc(activation):
    x = RNG.standard_normal((2, 5, 3, 8)).astype(np.float32) * 3 + 1
    gamma = RNG.standard_normal(8).astype(np.float32)
    beta = RNG.standard_normal(8).astype(np.float32)
    (got,) = run_lowered(
        "GroupNorm",
        {"x": x},
        {"gamma": gamma, "beta": beta},
        epsilon=1e-5,
        groups=4,
        activation=activation,
        channels_last=1,
    )
    want = F.group_norm(nchw(x), 4, torch.from_numpy(gamma), torch.from_numpy(beta), 1e-5)
    want = F.silu(want) if activation else want
    np.testing.assert_allclose(got, nhwc(want), atol=2e-5)


def test_group_norm_lowering_nchw_and_fp16_input_with_fp32_affine():
    x = RNG.standard_normal((1, 6, 4, 4)).astype(np.float16)
    gamma = RNG.standard_normal(6).astype(np.float32)
    beta = RNG.standard_normal(6).astype(np.float32)
    (got,) = run_lowered(
        "GroupNorm", {"x": x}, {"gamma": gamma, "beta": beta}, epsilon=1e-5, groups=3,
        activation=0, channels_last=0,
    )  # fmt: skip
    want = F.group_norm(
        torch.from_numpy(x).float(), 3, torch.from_numpy(gamma), torch.from_numpy(beta)
    )
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.numpy(), atol=1e-2)


def test_skip_group_norm_lowering_adds_skip_and_bias_and_returns_the_sum():
    x = RNG.standard_normal((2, 3, 3, 8)).astype(np.float32)
    skip = RNG.standard_normal((2, 1, 1, 8)).astype(np.float32)  # broadcast, like temb
    gamma, beta, bias = (RNG.standard_normal(8).astype(np.float32) for _ in range(3))
    got, total = run_lowered(
        "SkipGroupNorm",
        {"x": x},
        {"gamma": gamma, "beta": beta, "skip": skip, "bias": bias},
        n_outputs=2,
        epsilon=1e-5,
        groups=2,
        activation=1,
        channels_last=1,
    )
    want_total = x + skip + bias
    want = F.silu(
        F.group_norm(nchw(want_total), 2, torch.from_numpy(gamma), torch.from_numpy(beta), 1e-5)
    )
    np.testing.assert_allclose(total, want_total, atol=1e-6)
    np.testing.assert_allclose(got, nhwc(want), atol=2e-5)


@pytest.mark.parametrize(("group", "stride", "pads"), [(1, 1, [1, 1, 1, 1]), (2, 2, [0, 1, 0, 1])])
def test_nhwc_conv_lowering_matches_torch_conv(group, stride, pads):
    x = RNG.standard_normal((2, 7, 6, 4)).astype(np.float32)
    weight = RNG.standard_normal((6, 4 // group, 3, 3)).astype(np.float32)  # OIHW
    bias = RNG.standard_normal(6).astype(np.float32)
    (got,) = run_lowered(
        "NhwcConv",
        {"x": x},
        {"w": weight.transpose(0, 2, 3, 1).copy(), "b": bias},  # NhwcConv takes OHWI
        group=group,
        strides=[stride, stride],
        pads=pads,
        kernel_shape=[3, 3],
    )
    padded = F.pad(nchw(x), (pads[1], pads[3], pads[0], pads[2]))
    want = F.conv2d(padded, torch.from_numpy(weight), torch.from_numpy(bias), stride, groups=group)
    np.testing.assert_allclose(got, nhwc(want), atol=1e-5)


def test_bias_split_gelu_lowering_is_geglu():
    x = RNG.standard_normal((2, 5, 12)).astype(np.float32)
    bias = RNG.standard_normal(12).astype(np.float32)
    (got,) = run_lowered("BiasSplitGelu", {"x": x}, {"bias": bias})
    hidden, gate = (torch.from_numpy(x) + torch.from_numpy(bias)).chunk(2, dim=-1)
    np.testing.assert_allclose(got, (hidden * F.gelu(gate)).numpy(), atol=1e-6)


def test_bias_add_lowering():
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    bias = RNG.standard_normal(4).astype(np.float32)
    skip = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    (got,) = run_lowered("BiasAdd", {"x": x}, {"bias": bias, "skip": skip})
    np.testing.assert_allclose(got, x + bias + skip, atol=1e-6)


# ----- what ORT's CUDA kernels accept ---------------------------------------------------------


def chain_of(ops: list[tuple[str, dict, dict]]) -> onnx.ModelProto:
    """x through each (op, constants, attributes) in turn, named op_0, op_1..."""
    nodes, inits, value = [], [], "x"
    for i, (op, constants, attrs) in enumerate(ops):
        names = [f"{k}_{i}" for k in constants]
        inits += [numpy_helper.from_array(v, f"{k}_{i}") for k, v in constants.items()]
        nodes.append(helper.make_node(
            op, [value, *names], [f"y_{i}"], name=f"op_{i}", domain="com.microsoft", **attrs
        ))  # fmt: skip
        value = f"y_{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, None)], initializer=inits,
    )  # fmt: skip
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def group_norm_step(channels: int, gamma_dtype=np.float32, channels_last: int = 1):
    constants = {
        "gamma": np.ones(channels, gamma_dtype), "beta": np.zeros(channels, gamma_dtype)
    }  # fmt: skip
    attrs = {"epsilon": 1e-5, "groups": 32, "activation": 0, "channels_last": channels_last}
    return ("GroupNorm", constants, attrs)


def bias_add_step(channels: int):
    return ("BiasAdd", {"bias": np.ones(channels, np.float32), "skip": np.ones((2, 4, channels),
            np.float32)}, {})  # fmt: skip


@pytest.mark.parametrize(
    "step, shape, reason",
    [
        (("BiasSplitGelu", {"bias": np.ones(64, np.float32)}, {}), (2, 4, 64), "width 64"),
        (bias_add_step(32), (2, 4, 32), "BiasAdd channels 32"),
        (group_norm_step(64, channels_last=0), (2, 64, 4, 4), "channels_last=0"),
        (group_norm_step(64, gamma_dtype=np.float16), (2, 4, 4, 64), "gamma/beta not float32"),
    ],
)
def test_nodes_the_cuda_kernels_refuse_are_written_back_as_standard_onnx(step, shape, reason):
    model = chain_of([step])
    x = RNG.standard_normal(shape).astype(np.float32)
    want = ort.InferenceSession(lower_cuda_ops(model).SerializeToString(), providers=CPU).run(
        None, {"x": x}
    )
    unfused = unfuse_unsupported(model)
    assert len(unfused) == 1 and reason in next(iter(unfused)), unfused
    assert cuda_only_ops(model) == {}  # runs on ORT CPU (and on CUDA) as standard ONNX
    got = ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize(
    "steps, kept",
    [
        # every node is checked, not the first only, in either order
        ([group_norm_step(320), group_norm_step(320, gamma_dtype=np.float16)], ["op_0"]),
        ([group_norm_step(320, channels_last=0), group_norm_step(320)], ["op_1"]),
        ([bias_add_step(320), bias_add_step(32)], ["op_0"]),
        ([("BiasSplitGelu", {"bias": np.ones(2560, np.float32)}, {})], ["op_0"]),
        ([bias_add_step(640), bias_add_step(1280)], ["op_0", "op_1"]),
    ],
)
def test_nodes_of_sizes_the_kernels_take_stay_fused(steps, kept):
    model = chain_of(steps)
    unfuse_unsupported(model)
    fused = [n.name for n in model.graph.node if n.domain == "com.microsoft"]
    assert fused == kept


def test_fused_node_names_map_lowered_nodes_back():
    assert fused_node_names(["GroupNorm_3/lowered/4", "GroupNorm_3/lowered/7", "/unet/Add"]) == [
        "/unet/Add",
        "GroupNorm_3",
    ]
    # a node unfused for good is a node of the fused graph: it keeps its own name
    assert fused_node_names(["B/lowered/1"], present={"B/lowered/1"}) == ["B/lowered/1"]


@pytest.fixture(scope="module")
def fused_graphs(tiny_pipe, tmp_path_factory):
    """(plain, fused) fp32 graphs of the tiny U-Net (attention emitted) and VAE decoder."""
    folder = tmp_path_factory.mktemp("fusions")
    by_name = {c.name: c for c in components(tiny_pipe)}
    dims = trace_dims(16, 1000, 2 ** (len(tiny_pipe.vae.config.block_out_channels) - 1))
    graphs = {}
    for name in ("unet", "vae_decoder"):
        path = folder / f"{name}.onnx"
        assert export_onnx(by_name[name], dims, path, "fp32", name == "unet").cuda_only == {}
        plain = onnx.load(str(path))
        work = folder / f"{name}-fused"
        work.mkdir()
        fused = fuse_for_cuda(onnx.load(str(path)), work)
        load_external_data_for_model(fused, str(work))
        graphs[name] = (plain, fused, by_name[name], dims)
    return graphs


@pytest.mark.parametrize("name", ["unet", "vae_decoder"])
def test_fusion_pass_rewrites_the_export_and_computes_the_same(fused_graphs, name):
    plain, fused, component, dims = fused_graphs[name]
    counts = cuda_only_ops(fused)
    expected = CUDA_ONLY_OPS if name == "unet" else ("NhwcConv", "GroupNorm", "SkipGroupNorm")
    assert set(expected) <= set(counts), counts
    convs = sum(n.op_type == "Conv" for n in plain.graph.node)
    assert counts["NhwcConv"] == convs  # every convolution went channels-last
    resizes = [sum(n.op_type == "Resize" for n in g.graph.node) for g in (plain, fused)]
    assert resizes[0] == resizes[1]  # what the bundle's vae_scale_factor check counts
    casts = sum(n.op_type == "Cast" for n in fused.graph.node)
    assert casts <= sum(n.op_type == "Cast" for n in plain.graph.node)  # no-op casts go
    # the domain is imported even where the export had no contrib op before (the VAE)
    assert "com.microsoft" in {o.domain for o in fused.opset_import}
    feeds = component.sample_inputs({**dims, "batch": 2, "unet_batch": 2}, seed=3)

    def run(model: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)[0]

    want = run(plain)
    np.testing.assert_allclose(run(lower_cuda_ops(fused)), want, atol=1e-5 * np.abs(want).max())


def test_cuda_fusions_bundle_records_ops_and_runs_only_on_cuda(tiny_pipe, tmp_path):
    from sdrt.export.tensorrt_build import build_engines

    out = tmp_path / "nhwc"
    manifest = bundle_writer.export_bundle(
        tiny_pipe,
        out,
        "sd1",
        dtype="fp16",
        progress=False,
        fused_attention=True,
        cuda_fusions=True,
        static_sizes=[(64, 64)],
    )
    assert manifest["cuda_fusions"] is True
    entries = manifest["components"]
    assert entries["unet"]["cuda_only_ops"]["NhwcConv"] > 0
    assert entries["vae_decoder"]["cuda_only_ops"]["GroupNorm"] > 0
    assert entries["text_encoder"]["cuda_only_ops"] == {}
    assert entries["unet"]["parity"]["runtime"].endswith("CUDA-only ops as standard ONNX")
    # the tiny U-Net's widths are below what ORT's CUDA kernels take: written back, and said so
    assert not {"BiasSplitGelu", "BiasAdd"} & set(entries["unet"]["cuda_only_ops"])
    reasons = " ".join(entries["unet"]["cuda_unfused"])
    assert "BiasSplitGelu width" in reasons and "BiasAdd channels" in reasons
    assert entries["unet"]["parity"]["max_rel"] < 3e-2
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # fp16 with the GroupNorm affine kept fp32, as ORT's CUDA kernel takes it
    unet = onnx.load(str(out / "unet.onnx"))
    floats = {t.name: t.data_type for t in unet.graph.initializer}
    norm = next(n for n in unet.graph.node if n.op_type == "GroupNorm")
    assert [floats[i] for i in norm.input[1:]] == [TensorProto.FLOAT] * 2
    variant = out / entries["unet"]["static_variants"][0]["file"]
    assert cuda_only_ops(onnx.load(str(variant), load_external_data=False)) == cuda_only_ops(unet)
    with pytest.raises(UserError, match="only its CUDA provider runs.*--cuda-fusions"):
        Pipeline.load(out, device="cpu")
    with pytest.raises(UserError, match="--cuda-fusions"):
        build_engines(out)


def test_tiny_unet_fusions_the_cuda_kernels_refuse_are_unfused_and_group_norms_stay(
    fused_graphs,
):
    _, fused, _, _ = fused_graphs["unet"]
    model = onnx.ModelProto()
    model.CopyFrom(fused)
    before = cuda_only_ops(model)
    unfused = unfuse_unsupported(model)
    after = cuda_only_ops(model)
    assert sum(unfused.values()) == before["BiasSplitGelu"] + before["BiasAdd"]
    assert "BiasSplitGelu" not in after and "BiasAdd" not in after
    assert after["GroupNorm"] == before["GroupNorm"] and after["NhwcConv"] == before["NhwcConv"]
    assert unfuse_unsupported(model) == {}  # what is left, the kernels take


def test_lowering_in_place_restores_the_fused_nodes_even_on_error(fused_graphs):
    _, fused, _, _ = fused_graphs["unet"]
    before = [n.SerializeToString() for n in fused.graph.node]
    with pytest.raises(RuntimeError, match="measuring"), cuda_ops_lowered(fused) as standard:
        assert standard is fused and cuda_only_ops(standard) == {}
        raise RuntimeError("measuring failed")
    assert [n.SerializeToString() for n in fused.graph.node] == before
