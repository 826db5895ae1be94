"""`--dtype bf16`: every family exports bf16 weights and compute in the fp16 graph's shape (fp32
inputs and outputs, the sinusoidal embeddings fp32), verified on the CPU as an fp32 emulation
that rounds every bf16 tensor, which the manifest says; ONNX Runtime's CPU provider refuses a
bf16 bundle in one line; TensorRT 10 and 11 build its bf16 ONNX as it is, strongly typed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fake_tensorrt import FakeBuildAPI, FakeCudart
from onnx import TensorProto, helper, numpy_helper
from test_fp16_dit import overflowing_t5  # noqa: F401 (a fixture, asked for by name)
from test_tensorrt import H100, fake_builder, quiet_logger  # noqa: F401 (a fixture)

from sdrt.backends import tensorrt as trt_backend
from sdrt.bundle import Bundle
from sdrt.cli import main
from sdrt.engine_cache import read_entry
from sdrt.errors import UserError
from sdrt.export import bfloat16
from sdrt.export import tensorrt_build as tb
from sdrt.pipeline import Pipeline

BF16, FP16, FP32 = TensorProto.BFLOAT16, TensorProto.FLOAT16, TensorProto.FLOAT
ONNX_TYPES = {"float32": FP32, "int64": TensorProto.INT64, "int32": TensorProto.INT32}
DENOISER = {"tiny": "unet", "tiny-sd3": "transformer", "tiny-flux": "transformer"}


@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """preset -> its bf16 bundle, exported once each."""
    from sdrt.export.bundle_writer import export_bundle
    from sdrt.export.load import random_pipeline
    from sdrt.export.presets import PRESETS

    made: dict[str, Path] = {}

    def export(preset: str) -> Path:
        if preset not in made:
            path = tmp_path_factory.mktemp("bf16") / preset
            family = PRESETS[preset]["family"]
            export_bundle(random_pipeline(preset), path, family, "bf16", progress=False)
            made[preset] = path
        return made[preset]

    return export


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    typed = onnx.shape_inference.infer_shapes(model)
    values = (*typed.graph.input, *typed.graph.value_info, *typed.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values}


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3", "tiny-flux"])
def test_every_family_exports_bf16_weights_with_fp32_io_and_says_what_was_checked(
    bf16_bundle: Any, preset: str
) -> None:
    root = bf16_bundle(preset)
    bundle = Bundle.load(root)
    assert bundle.manifest["export"]["dtype"] == "bf16"
    for name, entry in bundle.manifest["components"].items():
        assert entry["precision"] == "bf16", name
        parity = entry["parity"]
        assert parity["runtime"] == "ONNX Runtime CPU, bf16 emulated"
        assert parity["check"] == bfloat16.BF16_PARITY["check"]
        assert parity["note"].startswith("bf16 arithmetic unverified on the CPU")
        assert parity["max_rel"] <= bfloat16.BF16_TOLERANCE
        model = onnx.load(str(root / entry["file"]))
        weights = {t.data_type for t in model.graph.initializer}
        assert BF16 in weights and FP16 not in weights, name
        io = [*model.graph.input, *model.graph.output]
        specs = {s["name"]: s["dtype"] for s in entry["inputs"] + entry["outputs"]}
        assert {v.name: v.type.tensor_type.elem_type for v in io} == {
            n: ONNX_TYPES[d] for n, d in specs.items()
        }
    # the timestep's (and Flux's guidance and RoPE) sinusoids stay fp32, as diffusers keeps them
    denoiser = onnx.load(str(root / f"{DENOISER[preset]}.onnx"))
    types = elem_types(denoiser)
    sines = [n.output[0] for n in denoiser.graph.node if n.op_type in ("Sin", "Cos")]
    assert sines and {types[s] for s in sines} == {FP32}
    computed = {
        types.get(o) for n in denoiser.graph.node if n.op_type == "MatMul" for o in n.output
    }
    assert BF16 in computed


def scaled_graph(weight: np.ndarray, constant: np.ndarray) -> onnx.ModelProto:
    """y = x * weight + constant, the constant a Constant node."""
    x = helper.make_tensor_value_info("x", FP32, list(weight.shape))
    y = helper.make_tensor_value_info("y", FP32, list(weight.shape))
    nodes = [
        helper.make_node(
            "Constant", [], ["c"], name="const", value=numpy_helper.from_array(constant)
        ),
        helper.make_node("Mul", ["x", "w"], ["xw"], name="mul"),
        helper.make_node("Add", ["xw", "c"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_are_rounded_to_bf16_from_fp32_never_clipped_through_fp16() -> None:
    """fp16 would clip 1e6 to 65504 and flush 1e-9 to its smallest subnormal; bf16 holds both."""
    weight = np.array([1e6, -3e7, 1e-9, 1.00390625 + 1e-6], np.float32)
    constant = np.array([2e5, 1e-10, -1.0, 7.0], np.float32)
    converted = bfloat16.convert_bf16(scaled_graph(weight, constant))
    [w] = converted.graph.initializer
    [const] = [n for n in converted.graph.node if n.op_type == "Constant"]
    for tensor, fp32 in ((w, weight), (const.attribute[0].t, constant)):
        assert tensor.data_type == BF16
        got = numpy_helper.to_array(tensor).astype(np.float32)
        np.testing.assert_array_equal(got, fp32.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("in_files", [False, True], ids=["weights inline", "weights in files"])
def test_the_fp32_emulation_rounds_every_bf16_tensor_where_it_is_made(
    tmp_path: Path, in_files: bool
) -> None:
    """Each output the emulation gives holds a bf16 value, and the exact fp32 result of the same
    rounded inputs differs from it: the rounding after Mul and Add is what it checks. Weights
    in files (a large bundle's) are upcast a tensor at a time into a file of their own."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(64).astype(np.float32)
    constant = rng.standard_normal(64).astype(np.float32)
    bf16 = bfloat16.convert_bf16(scaled_graph(weight, constant))
    if in_files:
        onnx.save_model(
            bf16,
            str(tmp_path / "m.onnx"),
            save_as_external_data=True,
            location="m.onnx.data",
            size_threshold=0,
        )
        bf16 = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    emulated = bfloat16.emulated_fp32(bf16, tmp_path, "weights.data")
    assert BF16 in {a.i for n in emulated.graph.node for a in n.attribute if a.name == "to"}
    onnx.save_model(emulated, str(tmp_path / "emulated.onnx"))
    session = ort.InferenceSession(
        str(tmp_path / "emulated.onnx"), providers=["CPUExecutionProvider"]
    )
    x = rng.standard_normal(64).astype(np.float32)
    [y] = session.run(None, {"x": x})

    def rounded(v: np.ndarray) -> np.ndarray:
        return v.astype(ml_dtypes.bfloat16).astype(np.float32)

    np.testing.assert_array_equal(y, rounded(y))
    expected = rounded(rounded(rounded(x) * rounded(weight)) + rounded(constant))
    np.testing.assert_array_equal(y, expected)
    assert not np.array_equal(y, rounded(x) * rounded(weight) + rounded(constant))
    assert (tmp_path / "weights.data").stat().st_size == (64 * 4 if in_files else 0)


def test_bf16_with_onnx_runtime_fused_ops_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b"
    args = ["export", "--random-weights", "tiny", str(out), "--dtype", "bf16", "--cuda-fusions"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "sdrt: error: --cuda-fusions is not supported with --dtype bf16 (ONNX Runtime's fused "
        "kernels for it are unverified in bf16); export without it, or with --dtype fp16"
    ]
    assert not out.exists()


def test_onnx_runtimes_cpu_provider_refuses_a_bf16_bundle_in_one_line(bf16_bundle: Any) -> None:
    with pytest.raises(UserError) as err:
        Pipeline.load(bf16_bundle("tiny"), device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert "is bf16, which ONNX Runtime's CPU provider cannot run" in message
    assert "--device cuda" in message and "--dtype fp32" in message


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> FakeBuildAPI:
    api = FakeBuildAPI(None, request.param)
    trt_api = trt_backend.TensorRT(api.module(), "tensorrt", "tensorrt")
    monkeypatch.setattr(tb, "import_tensorrt", lambda prefer=None: trt_api)
    monkeypatch.setattr(tb, "import_cudart", lambda: FakeCudart())
    monkeypatch.setattr(trt_backend, "_DEVICES", {})
    monkeypatch.setattr(tb, "trt_logger", lambda api: "logger")
    return api


@pytest.mark.parametrize("fake_trt", ["10", "11"], indirect=True)
def test_a_bf16_bundle_builds_bf16_engines_from_its_own_onnx_strongly_typed(
    bf16_bundle: Any, fake_trt: FakeBuildAPI, tmp_path: Path
) -> None:
    """No conversion and no builder flag (TensorRT 10's BuilderFlag.BF16 is weak typing, which
    11 dropped): the bundle's bf16 graphs go to the parser as they are, and the engine key
    names bf16."""
    root = shutil.copytree(bf16_bundle("tiny-flux"), tmp_path / "bundle")
    directory = tb.build_engines(root, batch=(1, 1), static=(64, 64), progress=False)
    entry = read_entry(directory)
    assert "-bf16-" in directory.name
    assert {c.precision for c in entry.spec.components.values()} == {"bf16"}
    assert entry.fp16_sources == {}
    assert set(fake_trt.calls) >= {("network flags", 1 << FakeBuildAPI.STRONGLY_TYPED)}
    assert not any(call[0] == "flag" for call in fake_trt.calls)
    parsed = {Path(path).name: data for path, data in fake_trt.parsed}
    assert set(parsed) == {f"{name}.onnx" for name in Bundle.load(root).components}
    assert all(Path(path).parent == root for path, _ in fake_trt.parsed)
    transformer = onnx.load_model_from_string(parsed["transformer.onnx"])
    assert BF16 in {t.data_type for t in transformer.graph.initializer}


@pytest.mark.usefixtures("quiet_logger")
def test_tensorrt_rtx_builds_a_bf16_onnx_as_it_is(bf16_bundle: Any, tmp_path: Path) -> None:
    api = FakeBuildAPI(None, "11")
    bundle = Bundle.load(bf16_bundle("tiny-sd3"))
    spec = tb.engine_spec(
        bundle,
        tb.size_ranges(batch=(1, 1), static=(64, 64), size_multiple=16),
        H100,
        ["transformer"],
        "auto",
        {},
    )
    profile = spec.components["transformer"].profile
    job = tb.BuildJob(
        "transformer", bundle.path("transformer"), "bf16", "bf16", profile, bundle, tmp_path
    )
    built = fake_builder(api, backend="tensorrt-rtx")(job)
    assert built.fp16_source is None
    assert [path for path, _ in api.parsed] == [str(bundle.path("transformer"))]


def test_a_bf16_vae_cannot_become_an_fp16_or_fp32_engine(bf16_bundle: Any) -> None:
    bundle = Bundle.load(bf16_bundle("tiny"))
    sizes = tb.size_ranges(batch=(1, 1), static=(64, 64))
    for wanted in ("fp16", "fp32"):
        with pytest.raises(UserError) as err:
            tb.engine_spec(bundle, sizes, H100, ["vae_decoder"], wanted, {})
        assert str(err.value) == (
            f"vae_decoder.onnx is bf16 in this bundle, so it cannot give an engine in {wanted}; "
            f"export the bundle with --dtype {wanted} for that"
        )


def test_sdrt_info_says_a_bf16_parity_is_the_emulated_one(
    bf16_bundle: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(bf16_bundle("tiny"))]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "unet.onnx" in line]
    assert len(lines) == 1 and lines[0].endswith(" (ONNX Runtime CPU, bf16 emulated)")


def test_a_triton_repository_for_a_bf16_bundle_on_cpu_instances_is_refused_when_written(
    bf16_bundle: Any, tmp_path: Path
) -> None:
    from sdrt.serve.triton_repo import RepoOptions, write_repository

    bundle = bf16_bundle("tiny")
    with pytest.raises(UserError, match=r"is bf16, which ONNX Runtime's CPU provider cannot run"):
        write_repository(bundle, tmp_path, RepoOptions(kind="cpu"))
    assert list(tmp_path.iterdir()) == []
    assert (write_repository(bundle, tmp_path, RepoOptions(kind="gpu")) / "config.pbtxt").is_file()


def test_t5s_projection_past_the_fp16_range_needs_no_fp32_node_in_bf16(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The T5 whose feed-forward output (~9e4 on real prompts) the fp16 policy must keep fp32:
    in bf16, with fp32's exponent, it converts whole and, emulated on those prompts, holds that
    value finite and matches PyTorch within the bf16 tolerance."""
    import torch
    from test_fp16_dit import WO, _node

    from sdrt.export.onnx_export import export_onnx

    t5, dims = request.getfixturevalue("overflowing_t5")
    path = tmp_path / "t5.onnx"
    export_onnx(t5, dims, path, "bf16")
    model = onnx.load(str(path))
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert weights[_node(model, WO).input[1]] == BF16  # nothing kept fp32 for range
    emulated = bfloat16.emulated_fp32(model, tmp_path, "emulated.data")
    projected = _node(emulated, WO).output[0].removesuffix("/fp32")
    emulated.graph.output.append(helper.make_tensor_value_info(projected, FP32, None))
    onnx.save_model(emulated, str(tmp_path / "emulated.onnx"))
    session = ort.InferenceSession(
        str(tmp_path / "emulated.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = t5.calibration[0]
    got, wo = session.run(None, feeds)
    with torch.no_grad():
        want = t5.module(torch.from_numpy(feeds["input_ids"])).numpy()
    assert np.abs(wo).max() > np.finfo(np.float16).max and np.isfinite(wo).all()
    max_rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert max_rel <= bfloat16.BF16_TOLERANCE
    print(
        f"bf16 T5 past fp16's range: projection max {np.abs(wo).max():.3g}, max rel {max_rel:.2e}"
    )
