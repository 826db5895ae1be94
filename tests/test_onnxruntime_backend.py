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
    CPU,
    CUDA,
    PROBE_MODEL,
    CudaOptions,
    OnnxRuntimeEngine,
    StaticVariant,
    auto_takes_cuda,
    cuda_graph_usable,
    cuda_provider_options,
    cuda_provider_starts,
    match_static_variant,
    preload_cuda_libraries,
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


def make_bundle(root, variants=(), precision="fp32") -> Bundle:
    from sdrt.export.optimize import static_variant_file, write_static_variant

    onnx.save_model(unet_like(), root / "unet.onnx")
    entries = [
        write_static_variant(root / "unet.onnx", dims, root / static_variant_file("unet", dims))
        for dims in variants
    ]
    info = ComponentInfo("unet", "unet.onnx", "-", precision, INPUTS, OUTPUTS, None)
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
    # without the cache: its entry for the variant's (unchanged) manifest sha256 would serve
    # the graph optimized before the file broke; catching that is the hash check's job
    engine = OnnxRuntimeEngine(bundle, "unet", "cpu", static_shapes="always", graph_cache=False)
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
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_onnxruntime_gpu_is_a_user_error(bundle, device):
    with pytest.raises(UserError, match=f"device '{device}' needs onnxruntime-gpu"):
        OnnxRuntimeEngine(bundle, "unet", device)


# ----- per-step transfers, lazy sessions, device placement -----------------------------------


@pytest.fixture(scope="module")
def static_tiny_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle plus a static variant of its U-Net at the default size."""
    import json
    import shutil

    from sdrt.export.optimize import static_variant_file, write_static_variant

    root = tmp_path_factory.mktemp("static") / "tiny"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    height, width = manifest["default_size"]
    scale = manifest["vae_scale_factor"]
    dims = {"unet_batch": 2, "latent_height": height // scale, "latent_width": width // scale}
    entry = manifest["components"]["unet"]
    entry["static_variants"] = [
        write_static_variant(root / entry["file"], dims, root / static_variant_file("unet", dims))
    ]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_per_unet_step_only_the_latents_and_timestep_are_copied_in(static_tiny_bundle, monkeypatch):
    """The spy sees every OrtValue refill (update_inplace) and device read (numpy); on the
    static path the conditioning goes into its buffer at the first step, then never again."""
    from sdrt import Pipeline

    pipe = Pipeline.load(static_tiny_bundle, device="cpu", static_shapes="always")
    unet = pipe.engines["unet"]
    refills, reads = [], []
    real_update, real_numpy = ort.OrtValue.update_inplace, ort.OrtValue.numpy

    def update_spy(self, data):
        refills.append((self, data))
        return real_update(self, data)

    def numpy_spy(self):
        reads.append(self)
        return real_numpy(self)

    monkeypatch.setattr(ort.OrtValue, "update_inplace", update_spy)
    monkeypatch.setattr(ort.OrtValue, "numpy", numpy_spy)
    steps = {"num_inference_steps": 3, "scheduler": "ddim", "output_type": "np", "seed": 0}
    pipe("a cat", **steps)
    (runner,) = [r for r in unet._static.values() if r is not None]
    names = {id(buffer): name for name, buffer in runner.inputs.items()}
    into_unet = [names[id(target)] for target, _ in refills if id(target) in names]
    per_step = ["sample", "timestep"]
    assert into_unet == per_step + ["encoder_hidden_states"] + per_step * 2
    # ...and the conditioning went device to device, never read back to the host
    conditioning = [d for t, d in refills if names.get(id(t)) == "encoder_hidden_states"]
    assert all(isinstance(d, ort.OrtValue) for d in conditioning)
    assert not [v for v in reads if id(v) in names]
    # a second request brings new conditioning: copied once again
    refills.clear()
    pipe("a dog", **steps)
    into_unet = [names[id(target)] for target, _ in refills if id(target) in names]
    assert into_unet.count("encoder_hidden_states") == 1


def test_dynamic_session_is_created_only_for_a_size_without_a_static_variant(
    static_tiny_bundle, caplog
):
    from sdrt import Pipeline

    def created():
        return [r.getMessage() for r in caplog.records if "created a session" in r.getMessage()]

    with caplog.at_level("DEBUG", logger="sdrt"):
        pipe = Pipeline.load(static_tiny_bundle, device="cpu", static_shapes="always")
        at_load = created()
        steps = {"num_inference_steps": 2, "output_type": "np", "seed": 0}
        pipe("a cat", **steps)
        unet = pipe.engines["unet"]
        assert unet._session is None
        assert [m for m in created() if m.startswith("unet:")] == [
            m for m in created() if m.startswith("unet:") and ".static-" in m
        ]
        height, width = pipe.manifest["default_size"]
        pipe("a cat", height=height, width=width + pipe.manifest["size_multiple"], **steps)
    assert unet._session is not None
    assert any(m.startswith("unet: created a session for unet.onnx") for m in created())
    # Pipeline.load's log names each session it made: text encoder, VAEs, no U-Net yet
    assert {m.split(":")[0] for m in at_load} == {"text_encoder", "vae_decoder", "vae_encoder"}


class FakeOrt:
    """Stands for onnxruntime 1.32's Python API as far as the backend uses it, for a machine
    with onnxruntime-gpu: get_available_providers(), SessionOptions, InferenceSession(path,
    sess_options, providers=[name or (name, options)]) with get_providers/get_inputs/
    get_outputs/io_binding, IOBinding.bind_ortvalue_input/bind_ortvalue_output/bind_cpu_input/
    bind_output(name, device_type, device_id), and OrtValue.ortvalue_from_shape_and_type(shape,
    dtype, device_type, device_id) with update_inplace and shape(). It records where things
    go and computes nothing."""

    CUDAExecutionProvider = CUDA

    def __init__(self):
        self.sessions: list[tuple[str, list]] = []
        self.events: list[str] = []  # "preload_dlls", "probe", "session", in call order
        self.cuda_starts = True  # False: the CUDA provider cannot load its libraries
        self.missing_kernel: str | None = None  # an op no provider has a kernel for, as "Conv(11)"
        self.allocations: list[tuple[str, int]] = []
        self.bound_outputs: list[tuple[str, int]] = []
        fake = self

        class OrtValue:
            def __init__(self, shape):
                self._shape = tuple(shape)

            @staticmethod
            def ortvalue_from_shape_and_type(shape, dtype, device_type, device_id):
                fake.allocations.append((device_type, device_id))
                return OrtValue(shape)

            def update_inplace(self, data):
                pass

            def shape(self):
                return list(self._shape)

        class Binding:
            def bind_ortvalue_input(self, name, value):
                pass

            def bind_ortvalue_output(self, name, value):
                pass

            def bind_cpu_input(self, name, array):
                pass

            def bind_output(self, name, device_type, device_id):
                fake.bound_outputs.append((device_type, device_id))

            def get_outputs(self):
                return [OrtValue((1,))]

        class Arg:
            def __init__(self, name, shape, type_):
                self.name, self.shape, self.type = name, shape, type_

        class InferenceSession:
            def __init__(self, path_or_bytes, options, providers):
                self.static = False
                if isinstance(path_or_bytes, bytes):  # a serialized model (the probe)
                    fake.events.append("probe")
                    return
                fake.events.append("session")
                if fake.missing_kernel:  # the message of onnxruntime 1.32's NotImplemented
                    raise Exception(
                        "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an "
                        f"implementation for {fake.missing_kernel} node with name '/conv_in/Conv'"
                    )
                fake.sessions.append((path_or_bytes, providers))
                self.static = ".static-" in path_or_bytes

            def get_providers(self):
                return [CUDA, "CPUExecutionProvider"] if fake.cuda_starts else [CPU]

            def _args(self, specs):
                sized = lambda s: [DIMS.get(d, d) for d in s] if self.static else s  # noqa: E731
                return [Arg(s["name"], sized(s["shape"]), s["dtype"]) for s in specs]

            def get_inputs(self):
                return self._args(INPUTS)

            def get_outputs(self):
                return self._args(OUTPUTS)

            def io_binding(self):
                return Binding()

            def run_with_iobinding(self, binding):
                pass

        self.OrtValue, self.InferenceSession = OrtValue, InferenceSession

    def get_available_providers(self):
        return [CUDA, "CPUExecutionProvider"]

    def preload_dlls(self, cuda=True, cudnn=True, msvc=True, directory=None):  # 1.21 and later
        self.events.append("preload_dlls")

    class SessionOptions:
        log_severity_level = 0


@pytest.fixture
def fake_gpu_ort(monkeypatch):
    import sys

    fake = FakeOrt()
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    monkeypatch.setenv("SDRT_GRAPH_CACHE", "off")  # the fake optimizes and writes nothing
    clear_process_caches()
    yield fake
    clear_process_caches()


def clear_process_caches() -> None:
    """The preload and the probe run once per process; each fake process starts anew."""
    for cached in (preload_cuda_libraries, cuda_provider_starts, auto_takes_cuda):
        cached.cache_clear()


def test_cuda_n_places_every_session_and_buffer_on_gpu_n(bundle, fake_gpu_ort):
    engine = OnnxRuntimeEngine(bundle, "unet", "cuda:1")
    assert fake_gpu_ort.sessions == []  # static variant in use: nothing made before a request
    engine.run_on_device(feeds_for(DIMS, seed=0))
    engine.to_device("encoder_hidden_states", np.zeros((2, 7, 8), np.float32))
    engine.run_on_device(feeds_for({**DIMS, "latent_width": 8}, seed=1))  # the dynamic graph
    assert [path.rsplit("/", 1)[-1] for path, _ in fake_gpu_ort.sessions] == [
        "unet.static-latent_height4-latent_width6-unet_batch2.onnx",
        "unet.onnx",
    ]
    for _, providers in fake_gpu_ort.sessions:
        (name, options), cpu = providers
        assert (name, options["device_id"], cpu) == (CUDA, "1", "CPUExecutionProvider")
    assert fake_gpu_ort.sessions[0][1][0][1]["enable_cuda_graph"] == "1"
    assert fake_gpu_ort.allocations and set(fake_gpu_ort.allocations) == {("cuda", 1)}
    assert set(fake_gpu_ort.bound_outputs) == {("cuda", 1)}


def test_plain_cuda_and_auto_mean_gpu_0(bundle, fake_gpu_ort):
    for device in ("cuda", "auto"):
        engine = OnnxRuntimeEngine(bundle, "unet", device, static_shapes="never")
        assert (engine.device_type, engine.device_id) == ("cuda", 0)
    assert {providers[0][1]["device_id"] for _, providers in fake_gpu_ort.sessions} == {"0"}


def test_a_cuda_provider_that_falls_back_to_the_cpu_is_a_user_error(bundle, fake_gpu_ort):
    fake_gpu_ort.cuda_starts = False
    with pytest.raises(UserError) as err:
        OnnxRuntimeEngine(bundle, "unet", "cuda", static_shapes="never")
    message = str(err.value)
    assert "could not start CUDAExecutionProvider" in message
    assert "the session has only CPUExecutionProvider" in message
    assert "[cuda,cudnn] extras" in message and "pip install 'sdrt[cuda13]'" in message


def test_cuda_libraries_are_preloaded_once_before_the_first_cuda_session(bundle, fake_gpu_ort):
    for _ in range(2):
        OnnxRuntimeEngine(bundle, "unet", "cuda", static_shapes="never")
    assert fake_gpu_ort.events == ["preload_dlls", "session", "session"]


def test_an_onnxruntime_without_preload_dlls_still_loads(bundle, fake_gpu_ort, monkeypatch):
    monkeypatch.delattr(FakeOrt, "preload_dlls")  # onnxruntime-gpu before 1.21
    OnnxRuntimeEngine(bundle, "unet", "cuda", static_shapes="never")
    assert fake_gpu_ort.events == ["session"]


def test_auto_runs_on_the_cpu_with_one_warning_when_the_cuda_provider_cannot_start(
    bundle, fake_gpu_ort
):
    fake_gpu_ort.cuda_starts = False
    with pytest.warns(RuntimeWarning, match="cannot start here.*running on the CPU") as caught:
        engines = [OnnxRuntimeEngine(bundle, "unet", "auto") for _ in range(2)]
    assert len(caught) == 1  # probed once per process, however many engines load
    assert [(e.provider, e.device_type, e.variants) for e in engines] == [(CPU, "cpu", [])] * 2
    assert fake_gpu_ort.events == ["preload_dlls", "probe", "session", "session"]
    assert all(providers == [CPU] for _, providers in fake_gpu_ort.sessions)


def test_auto_takes_the_cuda_provider_where_the_probe_gets_it(bundle, fake_gpu_ort):
    engine = OnnxRuntimeEngine(bundle, "unet", "auto", static_shapes="never")
    assert engine.provider == CUDA and fake_gpu_ort.events == ["preload_dlls", "probe", "session"]


def test_the_probe_model_is_an_identity_graph_that_onnxruntime_runs():
    x, y = (oh.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
    graph = oh.make_graph([oh.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    assert model.SerializeToString() == PROBE_MODEL
    session = ort.InferenceSession(PROBE_MODEL, providers=[CPU])
    assert session.run(None, {"x": np.full(1, 3.5, np.float32)})[0].tolist() == [3.5]
    assert not cuda_provider_starts()  # this machine: no CUDA provider


@pytest.mark.parametrize("device", ["gpu", "cuda1", "cuda:x", "CUDA"])
def test_unknown_device_names_are_refused_not_run_on_the_cpu(bundle, device):
    with pytest.raises(UserError, match="unknown device"):
        OnnxRuntimeEngine(bundle, "unet", device)


def test_a_bf16_graph_is_taken_by_the_cuda_provider_with_fp32_feeds(tmp_path, fake_gpu_ort):
    """Graph inputs and outputs stay fp32 in a bf16 bundle (it casts inside), so buffers and
    feeds are as for fp32; only the CPU provider is refused."""
    engine = OnnxRuntimeEngine(make_bundle(tmp_path, precision="bf16"), "unet", "cuda")
    engine.run_on_device(feeds_for(DIMS, seed=0))
    assert [providers[0][0] for _, providers in fake_gpu_ort.sessions] == [CUDA]
    assert {dtype for dtype, _ in engine.inputs.values()} == {"float32"}


def test_an_op_without_a_bf16_cuda_kernel_is_one_line_naming_it(tmp_path, fake_gpu_ort):
    fake_gpu_ort.missing_kernel = "Conv(11)"
    with pytest.raises(UserError) as err:
        OnnxRuntimeEngine(make_bundle(tmp_path, precision="bf16"), "unet", "cuda")
    assert str(err.value) == (
        "unet.onnx is bf16 and ONNX Runtime has no bf16 kernel for Conv(11) on "
        "CUDAExecutionProvider; build TensorRT engines for this bundle (`sdrt build`), or "
        "export it with --dtype fp16"
    )


def test_a_missing_kernel_in_an_fp32_graph_is_not_blamed_on_bf16(tmp_path, fake_gpu_ort):
    fake_gpu_ort.missing_kernel = "Conv(11)"
    with pytest.raises(Exception, match="NOT_IMPLEMENTED") as err:
        OnnxRuntimeEngine(make_bundle(tmp_path), "unet", "cuda", static_shapes="never")
    assert not isinstance(err.value, UserError)
