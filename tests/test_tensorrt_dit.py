"""TensorRT profiles of diffusion-transformer bundles cover their sequence dimensions: Flux's
image tokens follow the pixel range (one per 16x16 pixels), its position ids with them and
its T5 tokens fixed, one row per image (no classifier-free rows); SD3's rows double for
guidance and its joint CLIP + T5 sequence is fixed. Engines build into the cache unchanged."""

from __future__ import annotations

from test_tensorrt import build, spec_for

from sdrt.bundle import Bundle
from sdrt.engine_cache import ShapeRange

RANGES = {"batch": (1, 4), "height": (256, 1024), "width": (512, 1024), "opt": (512, 768)}


def test_flux_profiles_follow_the_image_tokens_with_one_row_per_image(preset_bundle):
    bundle = Bundle.load(preset_bundle("tiny-flux")[1])
    spec = spec_for(bundle, **RANGES)
    profile = spec.components["transformer"].profile
    # tokens: (256/16)(512/16) = 512, (512/16)(768/16) = 1536, (1024/16)^2 = 4096
    assert profile["sample"] == ShapeRange((1, 512, 64), (1, 1536, 64), (4, 4096, 64))
    assert profile["img_ids"] == ShapeRange((512, 3), (1536, 3), (4096, 3))
    assert profile["txt_ids"] == ShapeRange((16, 3), (16, 3), (16, 3))
    assert profile["guidance"] == ShapeRange((1,), (1,), (4,))
    assert profile["encoder_hidden_states"] == ShapeRange((1, 16, 80), (1, 16, 80), (4, 16, 80))
    assert spec.components["text_encoder_2"].profile["input_ids"] == ShapeRange(
        (1, 16), (1, 16), (4, 16)
    )
    assert spec.sizes.guidance == "none"  # recorded in the engine key as such
    engines = build(bundle, spec)
    assert {p.name for p in engines.iterdir()} >= {"transformer.engine", "engine.json"}


def test_sd3_profiles_double_the_rows_for_guidance_over_the_joint_sequence(preset_bundle):
    bundle = Bundle.load(preset_bundle("tiny-sd3")[1])
    profile = spec_for(bundle, **RANGES).components["transformer"].profile
    assert profile["sample"] == ShapeRange((2, 16, 32, 64), (2, 16, 64, 96), (8, 16, 128, 128))
    assert profile["encoder_hidden_states"] == ShapeRange(  # 77 CLIP + 16 T5 tokens
        (2, 93, 80), (2, 93, 80), (8, 93, 80)
    )
    assert profile["pooled_projections"] == ShapeRange((2, 64), (2, 64), (8, 64))


def test_flux_fp32_bundle_builds_on_tensorrt_11_with_a_measured_fp16_copy(
    preset_bundle, tmp_path, monkeypatch
):
    """The whole build with the version-shaped fake of TensorRT 11 (strongly typed only):
    every engine comes from an fp16 copy converted at build time, its calibration encoded by
    the bundle's own CLIP and T5; the transformer's sinusoids stay fp32 as in diffusers: the
    timestep's and guidance's embeddings and the RoPE angles of the position ids."""
    import shutil

    import onnx
    from fake_tensorrt import FakeBuildAPI, FakeCudart

    from sdrt.backends import tensorrt as trt_backend
    from sdrt.engine_cache import read_entry
    from sdrt.export import tensorrt_build as tb

    root = shutil.copytree(preset_bundle("tiny-flux")[1], tmp_path / "bundle")
    api = FakeBuildAPI(None, "11")
    trt_api = trt_backend.TensorRT(api.module(), "tensorrt", "tensorrt")
    monkeypatch.setattr(tb, "import_tensorrt", lambda prefer=None: trt_api)
    monkeypatch.setattr(tb, "import_cudart", lambda: FakeCudart())
    monkeypatch.setattr(trt_backend, "_DEVICES", {})
    monkeypatch.setattr(tb, "trt_logger", lambda api: "logger")
    directory = tb.build_engines(root, batch=(1, 1), static=(64, 64), progress=False)
    sources = read_entry(directory).fp16_sources
    assert set(sources) == set(Bundle.load(root).components)
    assert all(s.startswith("converted at build time, ") for s in sources.values())
    [transformer] = [d for path, d in api.parsed if path.endswith("transformer.onnx")]
    typed = onnx.shape_inference.infer_shapes(onnx.load_model_from_string(transformer))
    types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in typed.graph.initializer}
    sines = [n.output[0] for n in typed.graph.node if n.op_type in ("Sin", "Cos")]
    assert len(sines) == 10 and {types[name] for name in sines} == {onnx.TensorProto.FLOAT}
