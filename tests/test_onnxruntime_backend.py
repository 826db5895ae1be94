"""The ONNX Runtime engine: IO binding gives what a plain session gives, device values feed like
arrays, static-shape variants never serve stale buffers, and CUDA settings are chosen by rule."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from sdrt.backends.onnxruntime import (
    CUDA,
    CudaOptions,
    OnnxRuntimeEngine,
    StaticVariant,
    cuda_graph_usable,
    cuda_provider_options,
    match_static_variant,
    resolve_dims,
    session_providers,
    use_static_variants,
)
from sdrt.bundle import Bundle, ComponentInfo
from sdrt.errors import UserError

DIMS = {"unet_batch": 2, "latent_height": 4, "latent_width": 6}
LATENT = ["unet_batch", 4, "latent_height", "latent_width"]
INPUTS = [
    {"name": "sample", "dtype": "float32", "shape": LATENT},
    {"name": "timestep", "dtype": "float32", "shape": ["unet_batch"]},
    {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["unet_batch", 7, 8]},
]  # fmt: skip
OUTPUTS = [{"name": "noise_pred", "dtype": "float32", "shape": LATENT}]


def unet_like() -> onnx.ModelProto:
    """noise_pred = sample * mean(encoder_hidden_states) + timestep / 1000, per batch item,
    with the Shape arithmetic a traced graph has."""
    value = lambda spec: oh.make_tensor_value_info(spec["name"], TensorProto.FLOAT, spec["shape"])  # noqa: E731
    nodes = [
        oh.make_node("ReduceMean", ["encoder_hidden_states"], ["mean"], axes=[1, 2], keepdims=1),
        oh.make_node("Unsqueeze", ["mean", "axis3"], ["mean4"]),
        oh.make_node("Shape", ["timestep"], ["batch"]),
        oh.make_node("Concat", ["batch", "ones"], ["shape4"], axis=0),
        oh.make_node("Reshape", ["timestep", "shape4"], ["t4"]),
        oh.make_node("Mul", ["t4", "milli"], ["t_scaled"]),
        oh.make_node("Mul", ["sample", "mean4"], ["scaled"]),
        oh.make_node("Add", ["scaled", "t_scaled"], ["noise_pred"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([3], np.int64), "axis3"),
        numpy_helper.from_array(np.ones(3, np.int64), "ones"),
        numpy_helper.from_array(np.array(1e-3, np.float32), "milli"),
    ]
    graph = oh.make_graph(
        nodes, "unet_like", [value(s) for s in INPUTS], [value(s) for s in OUTPUTS], initializers
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def expected(feeds) -> np.ndarray:
    mean = feeds["encoder_hidden_states"].mean(axis=(1, 2))[:, None, None, None]
    return feeds["sample"] * mean + feeds["timestep"][:, None, None, None] / 1000


def feeds_for(dims, seed):
    rng = np.random.default_rng(seed)
    batch, height, width = dims["unet_batch"], dims["latent_height"], dims["latent_width"]
    return {
        "sample": rng.standard_normal((batch, 4, height, width), np.float32),
        "timestep": rng.uniform(0, 999, batch).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 7, 8), np.float32),
    }


def make_bundle(root, variants=()) -> Bundle:
    from sdrt.export.optimize import static_variant_file, write_static_variant

    onnx.save_model(unet_like(), root / "unet.onnx")
    entries = [
        write_static_variant(root / "unet.onnx", dims, root / static_variant_file("unet", dims))
        for dims in variants
    ]
    info = ComponentInfo("unet", "unet.onnx", "-", "fp32", INPUTS, OUTPUTS, None)
    entry = {"file": "unet.onnx", "inputs": INPUTS, "outputs": OUTPUTS, "static_variants": entries}
    return Bundle(root, {"components": {"unet": entry}}, {"unet": info})


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path, variants=[DIMS])


def test_io_binding_on_cpu_gives_exactly_what_a_plain_session_run_gives(bundle):
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu")
    feeds = feeds_for(DIMS, seed=0)
    plain = ort.InferenceSession(str(bundle.path("unet")), providers=["CPUExecutionProvider"])
    got = engine.run(feeds)
    assert list(got) == ["noise_pred"]
    assert isinstance(got["noise_pred"], np.ndarray) and got["noise_pred"].dtype == np.float32
    np.testing.assert_array_equal(got["noise_pred"], plain.run(None, feeds)[0])
    np.testing.assert_allclose(got["noise_pred"], expected(feeds), rtol=1e-5, atol=1e-6)


def test_feeds_are_cast_to_the_declared_dtype(bundle):
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu")
    feeds = feeds_for(DIMS, seed=1)
    as_float64 = {k: v.astype(np.float64) for k, v in feeds.items()}
    np.testing.assert_array_equal(
        engine.run(as_float64)["noise_pred"], engine.run(feeds)["noise_pred"]
    )


def test_device_values_feed_like_arrays_and_outputs_can_stay_on_the_device(bundle):
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu")
    feeds = feeds_for(DIMS, seed=2)
    embeddings = ort.OrtValue.ortvalue_from_numpy(feeds["encoder_hidden_states"])
    on_device = engine.run_on_device({**feeds, "encoder_hidden_states": embeddings})
    (value,) = on_device.values()
    assert isinstance(value, ort.OrtValue) and value.device_name() == "cpu"
    np.testing.assert_array_equal(value.numpy(), engine.run(feeds)["noise_pred"])
    # A device output feeds the next call without visiting numpy.
    chained = engine.run({**feeds, "sample": value, "encoder_hidden_states": embeddings})
    np.testing.assert_allclose(
        chained["noise_pred"], expected({**feeds, "sample": expected(feeds)}), rtol=1e-5, atol=1e-5
    )


def test_to_device_uploads_a_copy_in_the_declared_dtype(bundle):
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu")
    feeds = feeds_for(DIMS, seed=11)
    host = feeds["encoder_hidden_states"].astype(np.float64)
    uploaded = engine.to_device("encoder_hidden_states", host)
    assert uploaded.data_type() == "tensor(float)"
    want = engine.run(feeds)["noise_pred"]
    host[:] = 0  # the device value is a copy, not a view of the caller's array
    got = engine.run({**feeds, "encoder_hidden_states": uploaded})["noise_pred"]
    np.testing.assert_array_equal(got, want)


def test_default_cpu_engine_ignores_static_variants(bundle):
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu")
    assert engine.variants == []
    assert engine.static_runner(feeds_for(DIMS, seed=3)) is None


def test_static_variant_serves_matching_sizes_and_never_stale_values(bundle):
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu", static_shapes="always")
    first, second = feeds_for(DIMS, seed=4), feeds_for(DIMS, seed=5)
    assert engine.static_runner(first) is not None
    embeddings = ort.OrtValue.ortvalue_from_numpy(first["encoder_hidden_states"].copy())
    out_first = engine.run({**first, "encoder_hidden_states": embeddings})["noise_pred"]
    np.testing.assert_allclose(out_first, expected(first), rtol=1e-5, atol=1e-6)
    kept = out_first.copy()
    # Same device value object, new contents: the fixed input buffer must be refilled.
    embeddings.update_inplace(second["encoder_hidden_states"])
    out_second = engine.run({**second, "encoder_hidden_states": embeddings})["noise_pred"]
    np.testing.assert_allclose(out_second, expected(second), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_first, kept)  # earlier results are not the buffer


def test_preload_loads_each_static_variant_once(bundle):
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu", static_shapes="always")
    engine.preload()
    runner = engine.static_runner(feeds_for(DIMS, seed=9))
    assert runner is not None and engine.static_runner(feeds_for(DIMS, seed=10)) is runner


def test_sizes_without_a_static_variant_run_on_the_dynamic_graph(bundle):
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu", static_shapes="always")
    other = feeds_for({**DIMS, "latent_width": 8}, seed=6)
    assert engine.static_runner(other) is None
    np.testing.assert_allclose(
        engine.run(other)["noise_pred"], expected(other), rtol=1e-5, atol=1e-6
    )


def test_unloadable_static_variant_warns_and_falls_back_to_the_dynamic_graph(bundle):
    (entry,) = bundle.manifest["components"]["unet"]["static_variants"]
    (bundle.root / entry["file"]).write_bytes(b"not an onnx graph")
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu", static_shapes="always")
    feeds = feeds_for(DIMS, seed=7)
    with pytest.warns(RuntimeWarning, match="static variant"):
        got = engine.run(feeds)["noise_pred"]
    np.testing.assert_allclose(got, expected(feeds), rtol=1e-5, atol=1e-6)


def test_static_variant_missing_from_the_bundle_is_a_user_error(bundle):
    (entry,) = bundle.manifest["components"]["unet"]["static_variants"]
    (bundle.root / entry["file"]).unlink()
    with pytest.raises(UserError, match="missing from the bundle"):
        OnnxRuntimeEngine(bundle, "unet", "cpu")


def test_missing_and_mismatched_inputs_are_user_errors(bundle):
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu", static_shapes="always")
    feeds = feeds_for(DIMS, seed=8)
    with pytest.raises(UserError, match="timestep"):
        engine.run({k: v for k, v in feeds.items() if k != "timestep"})
    with pytest.raises(UserError, match="encoder_hidden_states has unet_batch=1 but sample"):
        engine.run({**feeds, "encoder_hidden_states": feeds["encoder_hidden_states"][:1]})


def test_resolve_dims_reads_named_sizes_and_checks_fixed_ones():
    specs = {s["name"]: (s["dtype"], s["shape"]) for s in INPUTS}
    shapes = {"sample": (2, 4, 4, 6), "timestep": (2,), "encoder_hidden_states": (2, 7, 8)}
    assert resolve_dims(specs, shapes) == DIMS
    with pytest.raises(UserError, match="expected"):
        resolve_dims(specs, {**shapes, "sample": (2, 3, 4, 6)})


def test_a_variant_matches_only_when_it_fixes_every_requested_size():
    full = StaticVariant(None, dict(DIMS))
    partial = StaticVariant(None, {"unet_batch": 2, "latent_height": 4})
    assert match_static_variant([partial, full], DIMS) is full
    assert match_static_variant([partial], DIMS) is None
    assert match_static_variant([full], {**DIMS, "unet_batch": 1}) is None


def test_static_variants_are_used_by_default_on_cuda_only():
    assert use_static_variants("auto", CUDA)
    assert not use_static_variants("auto", "CPUExecutionProvider")
    assert use_static_variants("always", "CPUExecutionProvider")
    assert not use_static_variants("never", CUDA)
    with pytest.raises(UserError, match="static_shapes"):
        use_static_variants("sometimes", CUDA)


def test_cuda_graphs_only_for_a_static_variant_on_the_cuda_provider():
    variant = StaticVariant(None, dict(DIMS))
    assert cuda_graph_usable(CUDA, True, variant)
    assert not cuda_graph_usable(CUDA, True, None)  # dynamic shapes: capture is refused
    assert not cuda_graph_usable(CUDA, False, variant)
    assert not cuda_graph_usable("CPUExecutionProvider", True, variant)


def test_cuda_provider_options_are_strings_and_optional_keys_appear_only_when_asked():
    default = cuda_provider_options(CudaOptions(), cuda_graph=False)
    assert default == {
        "device_id": "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
    }
    tuned = cuda_provider_options(CudaOptions(device_id=1, prefer_nhwc=True), cuda_graph=True)
    assert tuned["enable_cuda_graph"] == "1" and tuned["prefer_nhwc"] == "1"
    assert tuned["device_id"] == "1"
    providers = session_providers([CUDA, "CPUExecutionProvider"], CudaOptions(), cuda_graph=True)
    assert providers[0][0] == CUDA and providers[0][1]["enable_cuda_graph"] == "1"
    assert providers[1] == "CPUExecutionProvider"


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="onnxruntime-gpu is installed")
def test_cuda_device_without_onnxruntime_gpu_is_a_user_error(bundle):
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        OnnxRuntimeEngine(bundle, "unet", "cuda")
