"""Export-time optimisations keep what the graph computes: fused attention matches PyTorch, the
measured fp16 policy removes overflow, and static-shape variants match the dynamic graph."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from onnx.reference import ReferenceEvaluator
from onnxruntime.transformers.float16 import convert_float_to_float16

from sdrt.bundle import file_sha256
from sdrt.export.onnx_export import components, export_onnx, trace_dims
from sdrt.export.optimize import (
    FP16_MAX,
    TensorStats,
    calibration_stats,
    convert_fp16,
    count_nodes,
    fix_dims,
    fused_attention_for_export,
    input_dependent,
    keep_fp32_nodes,
    nonfinite_origins,
    sort_topologically,
    static_variant_file,
    stats_graph,
    timestep_embedding_nodes,
    write_static_variant,
)

CPU = ["CPUExecutionProvider"]
CHECK_DIMS = {"unet_batch": 1, "latent_height": 8, "latent_width": 12}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def run_ort(model_or_path, feeds) -> np.ndarray:
    if isinstance(model_or_path, onnx.ModelProto):
        source = model_or_path.SerializeToString()
    else:
        source = str(model_or_path)
    return ort.InferenceSession(source, providers=CPU).run(None, feeds)[0]


@pytest.fixture(scope="module")
def unet_component():
    from sdrt.export.load import random_pipeline

    pipe = random_pipeline("tiny", seed=0)
    return next(c for c in components(pipe) if c.name == "unet")


@pytest.fixture(scope="module")
def trace(unet_component):
    return trace_dims(4, 100, 8)


@pytest.fixture(scope="module")
def fused_unet(unet_component, trace, tmp_path_factory):
    """The tiny U-Net exported through the project's own export_onnx, with fused attention."""
    path = tmp_path_factory.mktemp("fused") / "unet.onnx"
    with fused_attention_for_export(unet_component.module) as fused:
        export_onnx(unet_component, trace, path, "fp32")
    return path, fused


def torch_reference(component, feeds) -> np.ndarray:
    with torch.no_grad():
        args = (torch.from_numpy(feeds[s.name]) for s in component.inputs)
        return component.module(*args).double().numpy()


# ----- fused attention -----------------------------------------------------------------------


def test_fused_unet_has_one_multiheadattention_per_attention_module(fused_unet):
    path, fused = fused_unet
    model = onnx.load(path)
    assert len(fused) == 8  # tiny U-Net: 1 + 2 + 1 transformer blocks, self + cross attention
    assert count_nodes(model, "MultiHeadAttention", "com.microsoft") == len(fused)
    assert count_nodes(model, "Softmax") == 0
    assert any(o.domain == "com.microsoft" for o in model.opset_import)


def test_fused_unet_on_ort_cpu_matches_pytorch_at_new_sizes(fused_unet, unet_component, trace):
    feeds = unet_component.sample_inputs({**trace, **CHECK_DIMS}, seed=1)
    got = run_ort(fused_unet[0], feeds)
    assert got.shape == (1, 4, 8, 12)
    assert relative_error(got, torch_reference(unet_component, feeds)) <= 1e-4


def test_fused_processor_is_eager_identical_and_originals_return_even_on_error(
    unet_component, trace
):
    unet = unet_component.module
    before = {name: m.processor for name, m in unet.named_modules() if hasattr(m, "processor")}
    feeds = unet_component.sample_inputs(trace, seed=2)
    want = torch_reference(unet_component, feeds)
    with pytest.raises(RuntimeError, match="mid-export"), fused_attention_for_export(unet) as fused:
        assert type(unet.get_submodule(fused[0]).processor).__name__ == "FusedAttentionProcessor"
        assert np.abs(torch_reference(unet_component, feeds) - want).max() <= 1e-6
        raise RuntimeError("mid-export")
    after = {name: m.processor for name, m in unet.named_modules() if hasattr(m, "processor")}
    assert all(after[name] is processor for name, processor in before.items())


def export_module(module, args, path, names):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=names, output_names=["out"], opset_version=17,
            dynamo=False,
        )  # fmt: skip
    return onnx.load(path)


def test_non_default_scale_is_exported_and_default_scale_is_left_to_the_op(tmp_path):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 12)
    for scale_qk, expect_scale in ((True, False), (False, True)):
        attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8, scale_qk=scale_qk).eval()
        with torch.no_grad():
            want = attn(x, context).double().numpy()
        with fused_attention_for_export(attn) as fused:
            model = export_module(attn, (x, context), tmp_path / "attn.onnx", ["x", "context"])
        assert fused == [""]
        (node,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
        scales = [a.f for a in node.attribute if a.name == "scale"]
        assert scales == ([1.0] if expect_scale else [])
        got = run_ort(model, {"x": x.numpy(), "context": context.numpy()})
        assert relative_error(got, want) <= 1e-5


def test_spatial_attention_with_group_norm_and_residual_fuses_exactly(tmp_path):
    """The VAE's mid-block attention: 4-D input, group norm, residual connection."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(
        16, heads=1, dim_head=16, norm_num_groups=4, residual_connection=True, bias=True,
        upcast_softmax=True, _from_deprecated_attn_block=True,
    ).eval()  # fmt: skip
    image = torch.randn(1, 16, 6, 5)
    with torch.no_grad():
        want = attn(image).double().numpy()
    with fused_attention_for_export(attn):
        model = export_module(attn, (image,), tmp_path / "vae_attn.onnx", ["image"])
    assert count_nodes(model, "MultiHeadAttention", "com.microsoft") == 1
    assert relative_error(run_ort(model, {"image": image.numpy()}), want) <= 1e-5


def test_masked_attention_uses_the_processor_it_replaced():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    x, mask = torch.randn(2, 5, 16), torch.zeros(2, 1, 5)
    mask[:, :, 3:] = -1e4
    with torch.no_grad():
        want = attn(x, attention_mask=mask)
        with fused_attention_for_export(attn):
            got = attn(x, attention_mask=mask)
            unmasked = attn(x)
    assert torch.equal(got, want)
    assert not torch.allclose(unmasked, want, atol=1e-3)  # the mask mattered


# ----- fp16 policy ---------------------------------------------------------------------------


def overflowing_graph() -> onnx.ModelProto:
    """x (|x| <= 100) -> MatMul with weights up to 400 (|y| ~ 1e5, past fp16) -> * 1e-3 -> Relu."""
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w"], ["y"], name="project"),
            oh.make_node("Mul", ["y", "small"], ["z"], name="scale_down"),
            oh.make_node("Relu", ["z"], ["out"], name="relu"),
        ],
        "overflow",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [oh.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
        [
            numpy_helper.from_array(np.linspace(100, 400, 16, dtype=np.float32).reshape(4, 4), "w"),
            numpy_helper.from_array(np.array(1e-3, np.float32), "small"),
        ],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


OVERFLOW_FEEDS = {"x": np.linspace(10, 100, 8, dtype=np.float32).reshape(2, 4)}


def test_nodes_making_or_reading_an_out_of_range_tensor_are_kept_fp32():
    model = overflowing_graph()
    stats = calibration_stats(model, [OVERFLOW_FEEDS])
    assert stats["y"].peak > FP16_MAX > stats["z"].peak
    # Relu sees only in-range values: blocking everything would also pass the parity test.
    # rounds=0: the range rule alone, without the fp16 run that follows it.
    assert keep_fp32_nodes(model, OVERFLOW_FEEDS, rounds=0) == ["project", "scale_down"]
    assert keep_fp32_nodes(model, OVERFLOW_FEEDS) == ["project", "scale_down"]


def test_policy_conversion_stays_finite_where_naive_conversion_overflows():
    model = overflowing_graph()
    want = ReferenceEvaluator(model).run(None, OVERFLOW_FEEDS)[0]
    naive = convert_float_to_float16(
        onnx.ModelProto.FromString(model.SerializeToString()), keep_io_types=True
    )
    sort_topologically(naive.graph)  # the reference evaluator needs spec order
    with np.errstate(over="ignore"):
        naive_out = ReferenceEvaluator(naive).run(None, OVERFLOW_FEEDS)[0]
    assert np.isinf(naive_out).any()  # true fp16 arithmetic, as on a GPU
    converted = convert_fp16(model, keep_fp32_nodes(model, OVERFLOW_FEEDS))
    ours = ReferenceEvaluator(converted).run(None, OVERFLOW_FEEDS)[0]
    assert np.isfinite(ours).all() and relative_error(ours, want) <= 1e-2
    assert relative_error(run_ort(converted, OVERFLOW_FEEDS), want) <= 1e-2


def test_the_edge_between_two_kept_nodes_stays_fp32():
    converted = convert_fp16(overflowing_graph(), ["project", "scale_down"])
    nodes = {n.name: n for n in converted.graph.node}
    # The raw converter would route project -> Cast(fp16) -> Cast(fp32) -> scale_down.
    assert nodes["scale_down"].input[0] == nodes["project"].output[0]
    types = {v.name: v.type.tensor_type.elem_type for v in converted.graph.value_info}
    assert types[nodes["project"].output[0]] == TensorProto.FLOAT
    assert nodes["project"].input[0] == "x"  # reads the fp32 graph input directly
    assert types[nodes["relu"].input[0]] == TensorProto.FLOAT16


def test_infinite_mask_values_do_not_force_fp32():
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "mask"], ["s"], name="add_mask"),
         oh.make_node("Softmax", ["s"], ["out"], name="softmax", axis=-1)],
        "masked",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [oh.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array([0, 0, -np.inf], np.float32), "mask")],
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    assert keep_fp32_nodes(model, {"x": np.ones((2, 3), np.float32)}) == []


def test_inf_is_charged_to_the_node_where_it_first_appears_and_casts_to_their_neighbours():
    graph = oh.make_graph(
        [oh.make_node("Relu", ["a"], ["b"], name="first"),
         oh.make_node("Exp", ["b"], ["c"], name="second"),
         oh.make_node("Cast", ["c"], ["c16"], name="c_cast_to_fp16_node", to=10),
         oh.make_node("Neg", ["c16"], ["d"], name="third")],
        "g", [oh.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [oh.make_tensor_value_info("d", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    model = oh.make_model(graph)
    finite, broken = TensorStats(1.0, True), TensorStats(0.0, False)
    fp32 = dict.fromkeys(["a", "b", "c", "d"], finite)
    names = {"first", "second", "third"}
    # Exp overflows: charged to Exp alone, not to the Neg downstream that inherits the inf.
    fp16 = {"a": finite, "b": finite, "c": broken, "c16": broken, "d": broken}
    assert nonfinite_origins(model, fp16, fp32, names) == {"second"}
    # Only the inserted cast breaks the value: both original nodes it joins are charged.
    fp16 = {"a": finite, "b": finite, "c": finite, "c16": broken, "d": broken}
    assert nonfinite_origins(model, fp16, fp32, names) == {"second", "third"}
    # Non-finite in fp32 already: not fp16's doing.
    fp32_broken = {**fp32, "c": broken}
    fp16 = {"a": finite, "b": finite, "c": broken, "c16": broken, "d": broken}
    assert nonfinite_origins(model, fp16, fp32_broken, names) == set()


def underflowing_graph() -> onnx.ModelProto:
    """ratio = x / y with x, y ~ 1e-8: fine in fp32 (ratio ~ 1), but both round to 0 in fp16."""
    graph = oh.make_graph(
        [oh.make_node("Div", ["x", "y"], ["ratio"], name="divide"),
         oh.make_node("Relu", ["ratio"], ["out"], name="relu")],
        "underflow",
        [oh.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "y")],
        [oh.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
    )  # fmt: skip
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


UNDERFLOW_FEEDS = {"x": np.full(4, 2e-8, np.float32), "y": np.full(4, 1e-8, np.float32)}


def summarise(values: np.ndarray) -> TensorStats:
    """What `calibration_stats` reports for one tensor, computed in numpy."""
    if values.dtype.kind != "f" or values.size == 0:
        return TensorStats(0.0, True)
    finite = np.isfinite(values)
    magnitudes = np.abs(values[finite])
    return TensorStats(float(magnitudes.max()) if magnitudes.size else 0.0, bool(finite.all()))


def fp16_kernel_stats(model, calibration, providers, chunk, folder=None):
    """calibration_stats computed as a GPU's fp16 kernels compute: onnx's reference evaluator
    runs fp16 ops in fp16 (ORT's CPU provider runs Div in fp32 and drops the casts around it)."""
    (feeds,) = calibration
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    names = [o for n in model.graph.node for o in n.output if o]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    with np.errstate(all="ignore"):
        values = ReferenceEvaluator(exposed).run(names, dict(feeds))
    stats = {k: summarise(np.asarray(v)) for k, v in feeds.items()}
    return stats | {k: summarise(np.asarray(v)) for k, v in zip(names, values, strict=True)}


def test_fp16_rounds_keep_what_fp16_breaks_inside_the_fp16_range(monkeypatch):
    from sdrt.export import optimize

    monkeypatch.setattr(optimize, "calibration_stats", fp16_kernel_stats)
    model = underflowing_graph()
    assert keep_fp32_nodes(model, UNDERFLOW_FEEDS, rounds=0) == []  # the range rule sees ~2
    with np.errstate(divide="ignore", invalid="ignore"):
        naive = ReferenceEvaluator(convert_fp16(model, [])).run(None, UNDERFLOW_FEEDS)[0]
    assert not np.isfinite(naive).all()
    keep = keep_fp32_nodes(model, UNDERFLOW_FEEDS)
    assert keep == ["divide"]
    kept = ReferenceEvaluator(convert_fp16(model, keep)).run(None, UNDERFLOW_FEEDS)[0]
    np.testing.assert_allclose(kept, 2.0)


def test_range_margin_keeps_values_a_quarter_of_the_way_to_the_fp16_limit():
    """Calibration peaks at 20 000 (fits fp16); a deployment input twice as large overflows.
    The margin (a quarter of 65504) keeps the node fp32 on the calibration alone."""
    model = overflowing_graph()
    scale = 20_000 / calibration_stats(model, [OVERFLOW_FEEDS])["y"].peak
    calibration = {"x": OVERFLOW_FEEDS["x"] * scale}
    deployment = {"x": calibration["x"] * 4}
    assert "project" in keep_fp32_nodes(model, calibration, rounds=0)
    assert "project" not in keep_fp32_nodes(model, calibration, range_fraction=1.0, rounds=0)
    unguarded = convert_fp16(model, keep_fp32_nodes(model, calibration, range_fraction=1.0))
    guarded = convert_fp16(model, keep_fp32_nodes(model, calibration))
    want = ReferenceEvaluator(model).run(None, deployment)[0]
    with np.errstate(over="ignore"):
        assert not np.isfinite(ReferenceEvaluator(unguarded).run(None, deployment)[0]).all()
    assert relative_error(ReferenceEvaluator(guarded).run(None, deployment)[0], want) <= 1e-2


def test_calibration_over_several_feeds_takes_each_tensors_worst():
    model = overflowing_graph()
    small = {"x": OVERFLOW_FEEDS["x"] / 100}
    assert keep_fp32_nodes(model, [small], rounds=0) == []
    assert keep_fp32_nodes(model, [small, OVERFLOW_FEEDS], rounds=0) == ["project", "scale_down"]


def test_stats_do_not_depend_on_how_many_tensors_are_summarised_per_session():
    model = overflowing_graph()
    whole = calibration_stats(model, [OVERFLOW_FEEDS])
    assert calibration_stats(model, [OVERFLOW_FEEDS], chunk=1) == whole
    assert {"x", "w", "small", "y", "z", "out"} <= set(whole)


def summarised_graph() -> onnx.ModelProto:
    """Each kind of tensor the in-graph summary must tell apart: floats with inf and nan, an
    empty one, fp16, an integer and a boolean."""
    graph = oh.make_graph(
        [
            oh.make_node("Div", ["x", "y"], ["ratio"], name="divide"),
            oh.make_node("Cast", ["ratio"], ["half"], name="to_half", to=TensorProto.FLOAT16),
            oh.make_node("Slice", ["x", "start", "start"], ["empty"], name="empty"),
            oh.make_node("Shape", ["x"], ["shape"], name="shape"),
            oh.make_node("Less", ["x", "y"], ["less"], name="less"),
        ],
        "kinds",
        [oh.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")],
        [oh.make_tensor_value_info("half", TensorProto.FLOAT16, [2, 3])],
        [numpy_helper.from_array(np.array([0], np.int64), "start")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_in_graph_stats_match_numpy_for_every_kind_of_tensor():
    model = summarised_graph()
    feeds = {
        "x": np.array([[1, -3e5, 0], [0, 5, -1]], np.float32),
        "y": np.array([[2, 1, 0], [1, 0, 4]], np.float32),  # 0/0 nan, 5/0 inf
    }
    stats = calibration_stats(model, [feeds])
    values = ReferenceEvaluator(model).run(["ratio", "half", "empty"], feeds)
    with np.errstate(all="ignore"):
        want = {n: summarise(v) for n, v in zip(["ratio", "half", "empty"], values, strict=True)}
    assert {n: stats[n] for n in want} == want
    assert want["ratio"] == TensorStats(3e5, False)  # the largest finite value, and not finite
    assert stats["x"] == TensorStats(3e5, True)
    assert not {"shape", "less", "start"} & set(stats)  # not floating point


def test_policy_on_weights_in_files_is_the_policy_in_memory(tmp_path):
    """A skeleton (weights in a file) gets the nodes and the fp16 weights a graph holding its
    weights gets, and the graph in memory is left as it was."""
    from onnx.external_data_helper import load_external_data_for_model

    from sdrt.export.external_data import weights_to_disk

    model = overflowing_graph()
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.linspace(100, 400, 1024, dtype=np.float32).reshape(4, 256), "w")
    )
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 256
    feeds = [OVERFLOW_FEEDS, {"x": OVERFLOW_FEEDS["x"] / 1000}]
    before = model.SerializeToString()
    keep = keep_fp32_nodes(model, feeds)
    assert model.SerializeToString() == before
    in_memory = convert_fp16(model, ["scale_down"])

    weights_to_disk(model, tmp_path, "weights")
    assert not model.graph.initializer[0].raw_data  # a skeleton now
    assert keep_fp32_nodes(model, feeds, folder=tmp_path) == keep
    on_disk = convert_fp16(model, ["scale_down"], tmp_path, "fp16.data")
    assert (tmp_path / "fp16.data").exists()
    load_external_data_for_model(on_disk, str(tmp_path))
    for tensor in on_disk.graph.initializer:
        tensor.ClearField("data_location")  # set to its default by the load
    assert on_disk.SerializeToString() == in_memory.SerializeToString()
    with pytest.raises(ValueError, match="pass the folder"):
        convert_fp16(model, ["scale_down"])


def test_fused_unet_converts_to_fp16_under_the_policy(fused_unet, unet_component, trace):
    model = onnx.load(fused_unet[0])
    feeds = unet_component.sample_inputs(trace, seed=3)
    converted = convert_fp16(model, keep_fp32_nodes(model, feeds, rounds=1))
    assert count_nodes(converted, "MultiHeadAttention", "com.microsoft") == 8
    got = run_ort(converted, feeds)
    assert relative_error(got, torch_reference(unet_component, feeds)) <= 3e-2


@pytest.fixture(scope="module")
def fp16_unet(unet_component, trace, tmp_path_factory):
    """The tiny U-Net exported in fp32 and in fp16 through export_onnx."""
    folder = tmp_path_factory.mktemp("fp16")
    for dtype in ("fp32", "fp16"):
        export_onnx(unet_component, trace, folder / f"{dtype}.onnx", dtype)
    return onnx.load(folder / "fp32.onnx"), onnx.load(folder / "fp16.onnx")


def test_timestep_embedding_chain_is_found_up_to_the_first_linear(fp16_unet):
    fp32, _ = fp16_unet
    chain = timestep_embedding_nodes(fp32)
    ops = {n.op_type for n in fp32.graph.node if n.name in chain}
    assert {"Sin", "Cos", "Mul", "Concat"} <= ops
    assert not ops & {"Gemm", "MatMul", "Conv"}
    # the frequencies: a constant read by the Mul of the timestep
    assert any(n.op_type == "Constant" for n in fp32.graph.node if n.name in chain)


def test_fp16_export_computes_the_timestep_embedding_in_fp32(fp16_unet):
    fp32, fp16 = fp16_unet
    chain = timestep_embedding_nodes(fp32)
    typed = onnx.shape_inference.infer_shapes(fp16)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*typed.graph.value_info, *typed.graph.input, *typed.graph.output)
    }
    types |= {t.name: t.data_type for t in typed.graph.initializer}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    constants = [n for n in typed.graph.node if n.op_type == "Constant" and n.name in chain]
    assert {n.attribute[0].t.data_type for n in constants} & floats == {TensorProto.FLOAT}
    on_chain = [n for n in typed.graph.node if n.name in chain]
    assert len(on_chain) == len(chain)  # every node of the chain survives conversion by name
    for node in on_chain:
        for name in [*node.input, *node.output]:
            if types.get(name) in floats:
                assert types[name] == TensorProto.FLOAT, f"{node.name}: {name} is fp16"


def embedding_node(fp32: onnx.ModelProto) -> str:
    """The node whose output the first Linear of the timestep embedding reads: the last of the
    chain, diffusers' `.to(sample.dtype)`, which in an fp16 graph is followed by a cast."""
    chain = timestep_embedding_nodes(fp32)
    made = {o: n.name for n in fp32.graph.node if n.name in chain for o in n.output}
    return next(
        made[n.input[0]] for n in fp32.graph.node if n.op_type == "Gemm" and n.input[0] in made
    )


def node_output(model: onnx.ModelProto, node_name: str, feeds) -> np.ndarray:
    (name,) = [n.output[0] for n in model.graph.node if n.name == node_name]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=CPU)
    return session.run([name], feeds)[0].astype(np.float64)


def test_fp16_timestep_embedding_matches_fp32_for_fractional_timesteps(
    fp16_unet, unet_component, trace
):
    fp32, fp16 = fp16_unet
    feeds = unet_component.sample_inputs(trace, seed=4)
    # Karras / Euler schedules put the U-Net at fractional timesteps; 999.37 is where fp16
    # is coarsest (a step of 0.5).
    last = embedding_node(fp32)
    for timestep in ([999.37, 981.62], [500.5, 0.77]):
        fed = {**feeds, "timestep": np.array(timestep, np.float32)}
        got, want = node_output(fp16, last, fed), node_output(fp32, last, fed)
        # measured 0.0 (the same fp32 arithmetic); with the chain in fp16, 0.22 near t=999
        assert np.abs(got - want).max() <= 1e-6


# ----- static-shape variants -----------------------------------------------------------------


def test_static_variant_has_fixed_dims_and_the_dynamic_graphs_output(
    fused_unet, unet_component, trace
):
    src = fused_unet[0]
    dst = src.with_name(static_variant_file("unet", CHECK_DIMS))
    entry = write_static_variant(src, {**trace, **CHECK_DIMS}, dst)
    assert dst.name == "unet.static-latent_height8-latent_width12-unet_batch1.onnx"
    assert entry["dims"] == CHECK_DIMS and entry["file"] == dst.name
    assert entry["sha256"] == file_sha256(dst)
    model = onnx.load(dst)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in
                 v.type.tensor_type.shape.dim]
        for v in (*model.graph.input, *model.graph.output)
    }  # fmt: skip
    assert shapes == {
        "sample": [1, 4, 8, 12],
        "timestep": [1],
        "encoder_hidden_states": [1, 77, 32],
        "noise_pred": [1, 4, 8, 12],
    }
    feeds = unet_component.sample_inputs({**trace, **CHECK_DIMS}, seed=4)
    assert relative_error(run_ort(dst, feeds), run_ort(src, feeds).astype(np.float64)) <= 1e-5


def shape_ops_left_by_ort(path, tmp_path) -> int:
    """Shape nodes in the graph ORT runs after its basic (provider-independent) passes."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=CPU)
    return count_nodes(onnx.load(options.optimized_model_filepath), "Shape")


def test_ort_folds_all_shape_arithmetic_of_a_static_variant(fused_unet, trace, tmp_path):
    src = fused_unet[0]
    dst = tmp_path / "unet.static.onnx"
    write_static_variant(src, {**trace, **CHECK_DIMS}, dst)
    assert count_nodes(onnx.load(src), "Shape") > 0
    assert shape_ops_left_by_ort(src, tmp_path) > 0  # dynamic: these run on the CPU under CUDA
    assert shape_ops_left_by_ort(dst, tmp_path) == 0


def test_fix_dims_names_the_dims_it_was_not_given(fused_unet):
    with pytest.raises(ValueError, match="latent_width"):
        fix_dims(onnx.load(fused_unet[0]), {"unet_batch": 2, "latent_height": 8})


def test_variant_beside_external_weights_points_at_them_instead_of_copying(
    fused_unet, unet_component, trace, tmp_path
):
    src = tmp_path / "unet.onnx"
    onnx.save_model(
        onnx.load(fused_unet[0]), src, save_as_external_data=True,
        location="unet.onnx.data", size_threshold=0,
    )  # fmt: skip
    data = tmp_path / "unet.onnx.data"
    dst = tmp_path / static_variant_file("unet", CHECK_DIMS)
    entry = write_static_variant(src, {**trace, **CHECK_DIMS}, dst)
    assert entry["external_data"] == "unet.onnx.data"
    assert entry["shares_external_data"] is True
    assert entry["sha256"] == file_sha256(dst)  # the shared weights are hashed with unet.onnx
    assert dst.stat().st_size < data.stat().st_size / 4
    assert not dst.with_name(dst.name + ".data").exists()
    feeds = unet_component.sample_inputs({**trace, **CHECK_DIMS}, seed=5)
    assert relative_error(run_ort(dst, feeds), run_ort(src, feeds).astype(np.float64)) <= 1e-5


def test_tensors_depending_on_inputs_are_found_in_any_node_order():
    model = overflowing_graph()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # as a graph pass may leave them; ORT sorts
    assert input_dependent(model.graph) == {"x", "y", "z", "out"}
    assert calibration_stats(model, [OVERFLOW_FEEDS]) == calibration_stats(
        overflowing_graph(), [OVERFLOW_FEEDS]
    )


def test_summaries_follow_their_tensors_and_weight_copies_come_last():
    """The measuring session runs the ready node listed first: each summary right after the
    node making its tensor, and a node computing from weights alone (here a transposed
    weight) after everything else, so it runs only when its reader is next."""
    model = overflowing_graph()
    model.graph.node.insert(0, oh.make_node("Transpose", ["w"], ["wt"], name="transpose"))
    model.graph.node[1].input[1] = "wt"
    names = ["x", "y", "z"]
    order = [n.name for n in stats_graph(model, names).graph.node]
    first = {n: order.index(f"sdrt_stats/{i}/float") for i, n in enumerate(names)}
    assert first["x"] < order.index("project") < first["y"] < order.index("scale_down")
    assert order.index("scale_down") < first["z"] < order.index("relu")
    assert order[-1] == "transpose"
    assert calibration_stats(model, [OVERFLOW_FEEDS])["y"].peak > FP16_MAX
