"""TensorRT build and runtime logic that needs no GPU: profiles, engine keys, stale-engine
refusal, atomic writes, shape checks and the "TensorRT not installed" path."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_tensorrt import (
    TEXT_DIM,
    TRT_VERSIONS,
    FakeBuildAPI,
    FakeCudart,
    fake_engine,
    fake_runtime_api,
)

from sdrt.backends import load_engine
from sdrt.backends import tensorrt as trt_backend
from sdrt.backends.base import upload_constants
from sdrt.bundle import Bundle, file_sha256
from sdrt.cli import _parser as main_parser
from sdrt.cli import main, parse_range, parse_size
from sdrt.engine_cache import (
    ENGINES_DIR,
    RECORD,
    ComponentSpec,
    EngineSpec,
    Environment,
    ShapeRange,
    SizeRanges,
    cache_key,
    read_entry,
    select_entry,
    staged_directory,
    usable_entries,
    write_atomic,
)
from sdrt.errors import UserError
from sdrt.export import tensorrt_build as tb

H100 = Environment("tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


# ---- a bundle on disk with SD 1.5's shapes (no weights: the ONNX files are placeholders) ----


def _io(name: str, dtype: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def _component_io() -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    latent = ["batch", 4, "latent_height", "latent_width"]
    image = ["batch", 3, "height", "width"]
    return {
        "text_encoder": (
            [_io("input_ids", "int32", ["batch", 77])],
            [_io("text_embeddings", "float32", ["batch", 77, TEXT_DIM])],
        ),
        "unet": (
            [
                _io("sample", "float32", ["unet_batch", 4, "latent_height", "latent_width"]),
                _io("timestep", "float32", ["unet_batch"]),
                _io("encoder_hidden_states", "float32", ["unet_batch", 77, TEXT_DIM]),
            ],
            [_io("noise_pred", "float32", ["unet_batch", 4, "latent_height", "latent_width"])],
        ),
        "vae_decoder": ([_io("latent", "float32", latent)], [_io("image", "float32", image)]),
        "vae_encoder": (
            [_io("image", "float32", image)],
            [_io("latent_moments", "float32", ["batch", 8, "latent_height", "latent_width"])],
        ),
    }


def _placeholder_graph(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> bytes:
    """A graph with the component's inputs and outputs and no nodes: what Bundle.load reads."""
    from onnx import TensorProto, helper

    def values(specs: list[dict[str, Any]]) -> list[Any]:
        return [helper.make_tensor_value_info(s["name"], TensorProto.FLOAT, None) for s in specs]

    graph = helper.make_graph([], "placeholder", values(inputs), values(outputs))
    return helper.make_model(graph).SerializeToString()


def make_bundle(root: Path, precision: str = "fp32") -> Bundle:
    root.mkdir(parents=True)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    components = {}
    for name, (inputs, outputs) in _component_io().items():
        path = root / f"{name}.onnx"
        path.write_bytes(_placeholder_graph(inputs, outputs))
        components[name] = {
            "file": path.name,
            "external_data": None,
            "sha256": file_sha256(path),
            "precision": precision,
            "inputs": inputs,
            "outputs": outputs,
            "parity": {"max_abs": 0.0, "max_rel": 0.0},
        }
    manifest = {
        "schema_version": 1,
        "family": "sd1",
        "prediction_type": "epsilon",
        "latent_channels": 4,
        "vae_scale_factor": 8,
        "vae_scaling_factor": 0.18215,
        "text_max_length": 77,
        "default_size": [512, 512],
        "size_multiple": 64,
        "scheduler": "pndm",
        "scheduler_config": {},
        "components": components,
        "tokenizer_files": {
            "tokenizer": {"vocab.json": file_sha256(root / "tokenizer/vocab.json")}
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return Bundle.load(root)


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path / "bundle")


def spec_for(
    bundle: Bundle, env: Environment = H100, vae_precision: str = "auto", **ranges: Any
) -> EngineSpec:
    sizes = tb.size_ranges(size_multiple=64, **ranges)
    names = tb.select_components(bundle, None)
    return tb.engine_spec(bundle, sizes, env, names, vae_precision, {"optimization_level": 3})


class FakeBuilder:
    """Stands in for TensorRT: records the jobs and returns bytes naming the component."""

    def __init__(self, fail_on: str | None = None, error: type[BaseException] = RuntimeError):
        self.jobs: list[tb.BuildJob] = []
        self.fail_on = fail_on
        self.error = error

    def __call__(self, job: tb.BuildJob) -> tb.BuiltEngine:
        self.jobs.append(job)
        if job.component == self.fail_on:
            raise self.error(f"simulated build failure in {job.component}")
        return tb.BuiltEngine(f"engine for {job.component}".encode(), None)


def build(bundle: Bundle, spec: EngineSpec, builder: FakeBuilder | None = None) -> Path:
    return tb.write_engines(bundle, spec, builder or FakeBuilder(), log=lambda line: None)


def onnx_hashes(bundle: Bundle) -> dict[str, str]:
    return {name: c.sha256 for name, c in bundle.components.items()}


# ---- profiles -------------------------------------------------------------------------------


def test_unet_profile_doubles_the_batch_for_guidance_and_divides_pixels_by_the_vae_scale(
    bundle: Bundle,
) -> None:
    unet = spec_for(bundle, batch=(1, 4), height=(256, 1024), width=(256, 1024)).components["unet"]
    assert unet.profile["sample"] == ShapeRange((2, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert unet.profile["timestep"] == ShapeRange((2,), (2,), (8,))
    assert unet.profile["encoder_hidden_states"] == ShapeRange(
        (2, 77, TEXT_DIM), (2, 77, TEXT_DIM), (8, 77, TEXT_DIM)
    )


def test_text_encoder_covers_prompts_alone_up_to_the_doubled_batch_with_fixed_length(
    bundle: Bundle,
) -> None:
    text = spec_for(bundle, batch=(1, 4)).components["text_encoder"]
    assert text.profile["input_ids"] == ShapeRange((1, 77), (2, 77), (8, 77))
    unguided = spec_for(bundle, batch=(1, 4), guidance="none").components["text_encoder"]
    assert unguided.profile["input_ids"] == ShapeRange((1, 77), (1, 77), (4, 77))


def test_vae_profiles_use_the_image_batch_and_latent_or_pixel_sizes(bundle: Bundle) -> None:
    spec = spec_for(bundle, batch=(1, 4), height=(256, 768), width=(512, 1024), opt=(512, 640))
    decoder = spec.components["vae_decoder"].profile["latent"]
    encoder = spec.components["vae_encoder"].profile["image"]
    assert decoder == ShapeRange((1, 4, 32, 64), (1, 4, 64, 80), (4, 4, 96, 128))
    assert encoder == ShapeRange((1, 3, 256, 512), (1, 3, 512, 640), (4, 3, 768, 1024))


def test_static_size_makes_min_opt_and_max_equal_but_keeps_the_batch_range(
    bundle: Bundle,
) -> None:
    sample = spec_for(bundle, batch=(1, 2), static=(512, 768)).components["unet"].profile["sample"]
    assert sample == ShapeRange((2, 4, 64, 96), (2, 4, 64, 96), (4, 4, 64, 96))


@pytest.mark.parametrize(
    ("guidance", "expected"),
    [("cfg", ((2,), (4,), (8,))), ("none", ((1,), (2,), (4,))), ("both", ((1,), (4,), (8,)))],
)
def test_guidance_mode_sets_the_unet_batch(
    bundle: Bundle, guidance: str, expected: tuple[tuple[int, ...], ...]
) -> None:
    spec = spec_for(bundle, batch=(1, 4), opt_batch=2, guidance=guidance)
    assert spec.components["unet"].profile["timestep"] == ShapeRange(*expected)
    assert spec.components["vae_decoder"].profile["latent"].max[0] == 4


def test_default_opt_size_is_512_clamped_into_the_range() -> None:
    sizes = tb.size_ranges(height=(768, 1024), width=(256, 448), size_multiple=64)
    assert sizes.height == (768, 768, 1024)
    assert sizes.width == (256, 448, 448)


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ({"height": (1024, 256)}, "height range 1024-256 has its minimum above its maximum"),
        ({"batch": (4, 1)}, "batch range 4-1 has its minimum above its maximum"),
        ({"batch": (0, 4)}, "batch must be at least 1"),
        ({"width": (256, 1000)}, "width maximum 1000 is not a multiple of 64"),
        ({"static": (500, 512)}, "height minimum 500 is not a multiple of 64"),
        ({"opt": (512, 2048)}, "opt width 2048 is outside the width range 256-1024"),
        ({"opt_batch": 8}, "opt batch 8 is outside the batch range 1-4"),
        ({"guidance": "double"}, "guidance 'double' is unknown"),
    ],
)
def test_bad_ranges_are_refused_with_the_offending_value(
    ranges: dict[str, Any], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        tb.size_ranges(size_multiple=64, **ranges)


def test_a_size_off_the_multiple_suggests_the_neighbours() -> None:
    with pytest.raises(UserError, match="use 448 or 512"):
        tb.size_ranges(height=(256, 500), size_multiple=64)


def test_range_and_size_strings_parse_and_garbage_is_refused() -> None:
    assert parse_range("1-4", "batch") == (1, 4)
    assert parse_range(" 2 ", "batch") == (2, 2)
    assert parse_size("512x768", "opt") == (512, 768)
    for bad in ("1-", "a-4", "1-2-3", "-1"):
        with pytest.raises(UserError, match="MIN-MAX"):
            parse_range(bad, "batch")
    for bad in ("512*512", "512", "x512", "512x512x3"):
        with pytest.raises(UserError, match="HEIGHTxWIDTH"):
            parse_size(bad, "opt")


def test_a_dimension_the_builder_cannot_size_is_refused(bundle: Bundle) -> None:
    info = dataclasses.replace(
        bundle.components["unet"], inputs=[_io("sample", "float32", ["frames", 4, 8, 8])]
    )
    with pytest.raises(UserError, match="'frames'"):
        tb.component_profile(info, {"batch": (1, 1, 1)})


def test_vae_precision_fp32_needs_an_fp32_onnx(tmp_path: Path) -> None:
    fp32 = make_bundle(tmp_path / "fp32", precision="fp32")
    spec = spec_for(fp32, vae_precision="fp32")
    assert spec.components["vae_decoder"].precision == "fp32"
    assert spec.components["unet"].precision == "fp16"
    fp16 = make_bundle(tmp_path / "fp16", precision="fp16")
    with pytest.raises(UserError, match="vae_decoder.onnx is fp16.*--dtype fp32"):
        spec_for(fp16, vae_precision="fp32")


def test_auto_vae_precision_keeps_fp32_where_fp16_is_known_to_overflow(tmp_path: Path) -> None:
    plain = make_bundle(tmp_path / "sd1")
    assert spec_for(plain).components["vae_decoder"].precision == "fp16"
    measured = make_bundle(tmp_path / "measured")
    measured.manifest["components"]["vae_decoder"]["precision_note"] = "fp16 failed verification"
    assert spec_for(measured).components["vae_decoder"].precision == "fp32"
    assert spec_for(measured).components["vae_encoder"].precision == "fp16"
    sdxl = make_bundle(tmp_path / "sdxl")
    sdxl.manifest["family"] = "sdxl"
    assert spec_for(sdxl).components["vae_encoder"].precision == "fp32"
    assert spec_for(sdxl, vae_precision="fp16").components["vae_encoder"].precision == "fp16"
    with pytest.raises(UserError, match="VAE precision 'bf16' is unknown"):
        spec_for(plain, vae_precision="bf16")


def test_unknown_components_and_options_are_refused(bundle: Bundle) -> None:
    with pytest.raises(UserError, match="no refiner"):
        tb.select_components(bundle, ["unet", "refiner"])
    assert tb.select_components(bundle, ["vae_decoder", "unet"]) == ["unet", "vae_decoder"]
    with pytest.raises(UserError, match="optimization level 7"):
        tb.check_builder_options(7, None)
    with pytest.raises(UserError, match="workspace"):
        tb.check_builder_options(3, 0)


# ---- cache keys -----------------------------------------------------------------------------


def test_cache_key_is_stable_and_readable(bundle: Bundle) -> None:
    key = cache_key(spec_for(bundle))
    assert key == cache_key(spec_for(bundle))
    assert key.startswith("tensorrt-10.13.0.35-sm90-fp16-b1-4-256x256-1024x1024-cfg-")
    assert len(key.rsplit("-", 1)[1]) == 12


def _changed_specs(spec: EngineSpec) -> dict[str, EngineSpec]:
    unet = spec.components["unet"]
    other_profile = dict(unet.profile, timestep=ShapeRange((2,), (2,), (16,)))

    def with_unet(component: ComponentSpec) -> EngineSpec:
        return dataclasses.replace(spec, components={**spec.components, "unet": component})

    def with_env(**change: str) -> EngineSpec:
        return dataclasses.replace(spec, environment=dataclasses.replace(H100, **change))

    return {
        "backend": with_env(backend="tensorrt-rtx"),
        "version": with_env(version="10.12.0.36"),
        "gpu": with_env(gpu_name="NVIDIA H100 PCIe"),
        "capability": with_env(compute_capability="8.9"),
        "precision": with_unet(dataclasses.replace(unet, precision="fp32")),
        "onnx": with_unet(dataclasses.replace(unet, onnx_sha256="0" * 64)),
        "profile": with_unet(dataclasses.replace(unet, profile=other_profile)),
        "sizes": dataclasses.replace(
            spec, sizes=SizeRanges((1, 1, 2), (256, 512, 1024), (256, 512, 1024))
        ),
        "builder": dataclasses.replace(spec, builder={"optimization_level": 5}),
    }


def test_cache_key_changes_when_any_recorded_field_changes(bundle: Bundle) -> None:
    spec = spec_for(bundle)
    keys = {name: cache_key(changed) for name, changed in _changed_specs(spec).items()}
    keys["original"] = cache_key(spec)
    assert len(set(keys.values())) == len(keys), keys


# ---- writing, reuse and invalidation --------------------------------------------------------


def test_build_writes_every_engine_and_a_record_of_what_the_key_encodes(bundle: Bundle) -> None:
    spec = spec_for(bundle)
    directory = build(bundle, spec)
    assert directory == bundle.root / ENGINES_DIR / cache_key(spec)
    assert (directory / "unet.engine").read_bytes() == b"engine for unet"
    record = json.loads((directory / RECORD).read_text())
    assert record["environment"]["gpu_name"] == H100.gpu_name
    assert record["components"]["unet"]["onnx_sha256"] == bundle.components["unet"].sha256
    assert record["components"]["unet"]["profile"]["sample"]["max"] == [8, 4, 128, 128]
    assert read_entry(directory).spec == spec


def test_a_complete_build_is_reused_and_force_rebuilds_it(bundle: Bundle) -> None:
    spec = spec_for(bundle)
    build(bundle, spec)
    again = FakeBuilder()
    build(bundle, spec, again)
    assert again.jobs == []
    forced = FakeBuilder()
    tb.write_engines(bundle, spec, forced, force=True, log=lambda line: None)
    assert [job.component for job in forced.jobs] == list(spec.components)


def test_a_damaged_build_is_rebuilt_not_reused(bundle: Bundle) -> None:
    spec = spec_for(bundle)
    directory = build(bundle, spec)
    (directory / "unet.engine").write_bytes(b"trunc")
    rebuild = FakeBuilder()
    build(bundle, spec, rebuild)
    assert len(rebuild.jobs) == len(spec.components)
    assert (directory / "unet.engine").read_bytes() == b"engine for unet"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_build_leaves_no_engine_directory(
    bundle: Bundle, error: type[BaseException]
) -> None:
    spec = spec_for(bundle)
    with pytest.raises(error, match="simulated"):
        build(bundle, spec, FakeBuilder(fail_on="vae_decoder", error=error))
    assert not (bundle.root / ENGINES_DIR / cache_key(spec)).exists()
    assert list((bundle.root / ENGINES_DIR).iterdir()) == []  # no staging left either


def test_a_failed_rebuild_keeps_nothing_half_written(bundle: Bundle) -> None:
    spec = spec_for(bundle)
    directory = build(bundle, spec)
    with pytest.raises(RuntimeError):
        tb.write_engines(
            bundle, spec, FakeBuilder(fail_on="unet"), force=True, log=lambda line: None
        )
    assert (directory / "unet.engine").read_bytes() == b"engine for unet"
    assert sorted(p.name for p in (bundle.root / ENGINES_DIR).iterdir()) == [directory.name]


def test_write_atomic_leaves_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "timing.cache"
    path.write_bytes(b"old")

    def disk_full(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]
    monkeypatch.undo()
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"


def test_staged_directory_appears_only_when_the_block_succeeds(tmp_path: Path) -> None:
    final = tmp_path / "engines" / "key"
    with pytest.raises(ValueError), staged_directory(final) as staging:
        (staging / "a.engine").write_bytes(b"x")
        assert not final.exists()
        raise ValueError
    assert not final.exists()
    with staged_directory(final) as staging:
        (staging / "a.engine").write_bytes(b"x")
    assert (final / "a.engine").read_bytes() == b"x"


def test_staging_left_by_a_killed_build_is_removed_by_the_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    final = tmp_path / "engines" / "key"
    final.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = final.with_name(f".key.partial-{dead.pid}")
    (leftover / "unet.engine").parent.mkdir()
    (leftover / "unet.engine").write_bytes(b"half")
    with staged_directory(final) as staging:
        (staging / "unet.engine").write_bytes(b"whole")
    assert not leftover.exists()
    assert str(leftover) in capsys.readouterr().err
    assert (final / "unet.engine").read_bytes() == b"whole"


@pytest.mark.parametrize(
    ("change", "field", "built", "here"),
    [
        ({"version": "10.14.1.48"}, "TensorRT version", "10.13.0.35", "10.14.1.48"),
        ({"gpu_name": "NVIDIA L40S"}, "GPU", "NVIDIA H100 80GB HBM3", "NVIDIA L40S"),
        ({"compute_capability": "8.9"}, "compute capability", "9.0", "8.9"),
        ({"backend": "tensorrt-rtx"}, "backend", "tensorrt", "tensorrt-rtx"),
    ],
)
def test_an_engine_built_elsewhere_is_refused_naming_the_field(
    bundle: Bundle, change: dict[str, str], field: str, built: str, here: str
) -> None:
    build(bundle, spec_for(bundle))
    elsewhere = dataclasses.replace(H100, **change)
    with pytest.raises(UserError) as err:
        usable_entries(bundle.root / ENGINES_DIR, "unet", elsewhere, onnx_hashes(bundle))
    message = str(err.value)
    assert f"{field}: built for {built!r}, this machine has {here!r}" in message
    assert "sdrt build" in message


def test_an_engine_from_an_older_onnx_is_refused(bundle: Bundle) -> None:
    build(bundle, spec_for(bundle))
    hashes = dict(onnx_hashes(bundle), unet="f" * 64)
    with pytest.raises(UserError, match="ONNX sha256 of unet.*re-exported"):
        usable_entries(bundle.root / ENGINES_DIR, "unet", H100, hashes)
    # The text encoder's ONNX did not change, so its engine is still good.
    assert usable_entries(bundle.root / ENGINES_DIR, "text_encoder", H100, hashes)


def test_an_engine_json_edited_by_hand_is_refused(bundle: Bundle) -> None:
    directory = build(bundle, spec_for(bundle))
    record = json.loads((directory / RECORD).read_text())
    record["environment"]["version"] = "10.14.1.48"
    (directory / RECORD).write_text(json.dumps(record))
    live = dataclasses.replace(H100, version="10.14.1.48")
    with pytest.raises(UserError, match="does not describe the engines"):
        usable_entries(bundle.root / ENGINES_DIR, "unet", live, onnx_hashes(bundle))


def test_a_truncated_engine_file_is_refused(bundle: Bundle) -> None:
    directory = build(bundle, spec_for(bundle))
    (directory / "unet.engine").write_bytes(b"eng")
    with pytest.raises(UserError, match="unet.engine has 3 bytes"):
        usable_entries(bundle.root / ENGINES_DIR, "unet", H100, onnx_hashes(bundle))


def test_engines_for_other_gpus_are_skipped_when_ours_exists(bundle: Bundle) -> None:
    l40s = dataclasses.replace(H100, gpu_name="NVIDIA L40S", compute_capability="8.9")
    build(bundle, spec_for(bundle, env=l40s))
    ours = build(bundle, spec_for(bundle))
    entries = usable_entries(bundle.root / ENGINES_DIR, "unet", H100, onnx_hashes(bundle))
    assert [e.directory for e in entries] == [ours]


def test_no_engines_at_all_tells_the_user_to_build(bundle: Bundle) -> None:
    with pytest.raises(UserError, match="no tensorrt engine for unet.*run `sdrt build"):
        usable_entries(bundle.root / ENGINES_DIR, "unet", H100, onnx_hashes(bundle))


# ---- shapes at run time ---------------------------------------------------------------------


def test_shapes_inside_the_profile_pass_and_outside_name_input_dimension_and_range(
    bundle: Bundle,
) -> None:
    profile = spec_for(bundle).components["unet"].profile
    inside = {"sample": (2, 4, 64, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    trt_backend.check_shape_in_profile("unet", inside, profile)
    too_big = dict(inside, sample=(2, 4, 160, 64))
    with pytest.raises(UserError) as err:
        trt_backend.check_shape_in_profile("unet", too_big, profile)
    message = str(err.value)
    assert "'sample'" in message and "dimension 2 is 160, outside 32..128" in message
    assert "(2..8, 4, 32..128, 32..128)" in message and "sdrt build" in message


def test_wrong_rank_and_missing_inputs_are_refused(bundle: Bundle) -> None:
    profile = spec_for(bundle).components["unet"].profile
    shapes = {"sample": (2, 4, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    with pytest.raises(UserError, match="'sample' has 3 dimensions, the engine takes 4"):
        trt_backend.check_shape_in_profile("unet", shapes, profile)
    with pytest.raises(UserError, match="input 'timestep' is missing"):
        trt_backend.check_shape_in_profile("unet", {"sample": (2, 4, 64, 64)}, profile)


def test_the_entry_whose_profile_covers_the_request_is_selected(bundle: Bundle) -> None:
    small = build(bundle, spec_for(bundle, static=(512, 512), batch=(1, 1)))
    large = build(bundle, spec_for(bundle, height=(768, 1024), width=(768, 1024)))
    entries = usable_entries(bundle.root / ENGINES_DIR, "unet", H100, onnx_hashes(bundle))

    def shapes(side: int) -> dict[str, tuple[int, ...]]:
        return {
            "sample": (2, 4, side, side),
            "timestep": (2,),
            "encoder_hidden_states": (2, 77, 768),
        }

    assert select_entry(entries, "unet", shapes(64)).directory == small
    assert select_entry(entries, "unet", shapes(128)).directory == large
    with pytest.raises(UserError, match="no built unet engine accepts"):
        select_entry(entries, "unet", shapes(80))


# ---- TensorRT or cuda-python missing --------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in trt_backend.TENSORRT_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail


def test_missing_tensorrt_is_a_user_error_with_the_install_command(
    no_tensorrt: None, bundle: Bundle
) -> None:
    with pytest.raises(UserError, match=r"pip install 'sdrt\[tensorrt-cu13\]'"):
        trt_backend.import_tensorrt()
    with pytest.raises(UserError, match=r"not installed here.*pip install 'sdrt\[tensorrt-cu13\]'"):
        load_engine("tensorrt", bundle, "unet", "cuda")


def test_build_engines_checks_ranges_before_needing_tensorrt(
    no_tensorrt: None, bundle: Bundle
) -> None:
    with pytest.raises(UserError, match="opt height 2048"):
        tb.build_engines(bundle.root, opt=(2048, 512))
    with pytest.raises(UserError, match=r"pip install 'sdrt\[tensorrt-cu13\]'"):
        tb.build_engines(bundle.root, progress=False)


def _fake_tensorrt(version: str) -> types.SimpleNamespace:
    module = types.SimpleNamespace(**{name: object() for name in trt_backend.REQUIRED_API})
    module.__version__ = version
    return module


def test_tensorrt_rtx_is_used_when_tensorrt_is_absent_and_says_so(
    no_tensorrt: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", _fake_tensorrt("1.7.1"))
    found = trt_backend.import_tensorrt()
    assert (found.backend, found.module_name, found.version) == (
        "tensorrt-rtx",
        "tensorrt_rtx",
        "1.7.1",
    )
    assert found.describe() == "tensorrt-rtx 1.7.1 (Python module tensorrt_rtx)"


def test_a_tensorrt_module_lacking_the_api_is_named(
    no_tensorrt: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = _fake_tensorrt("10.13.0.35")
    del partial.OnnxParser
    monkeypatch.setitem(sys.modules, "tensorrt", partial)
    with pytest.raises(UserError, match="tensorrt lacks OnnxParser"):
        trt_backend.import_tensorrt()


def test_type_stubs_alone_are_not_mistaken_for_tensorrt(
    no_tensorrt: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # no __file__
    with pytest.raises(UserError, match=r"tensorrt here is only type stubs.*pip install"):
        trt_backend.import_tensorrt()


def test_missing_cuda_python_is_a_user_error_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in trt_backend.CUDART_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match=r"cuda-python.*pip install 'sdrt\[tensorrt-cu13\]'"):
        trt_backend.import_cudart()


def test_a_machine_without_a_cuda_driver_is_a_user_error() -> None:
    no_driver = types.SimpleNamespace(name="cudaErrorInsufficientDriver")
    cudart = types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=0),
        cudaDriverGetVersion=lambda: (0, 12080),
        cudaRuntimeGetVersion=lambda: (0, 12080),
        cudaGetDeviceCount=lambda: (no_driver, None),
    )
    with pytest.raises(UserError, match="no usable CUDA GPU here.*InsufficientDriver"):
        trt_backend.CudaDevice(cudart, 0)


def test_the_engine_refuses_a_stale_build_at_load_time(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(bundle, spec_for(bundle))
    newer = dataclasses.replace(H100, version="10.14.1.48")
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda prefer=None: None)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: None)
    monkeypatch.setattr(trt_backend, "shared_device", lambda cudart, index: None)
    monkeypatch.setattr(trt_backend, "current_environment", lambda trt, device: newer)
    with pytest.raises(UserError, match="TensorRT version: built for '10.13.0.35'"):
        trt_backend.TensorRTEngine(bundle, "unet", "cuda")


def test_devices_cpu_and_unknown_are_refused() -> None:
    assert trt_backend.cuda_device_index("auto") == 0
    assert trt_backend.cuda_device_index("cuda:1") == 1
    with pytest.raises(UserError, match="onnxruntime for --device cpu"):
        trt_backend.cuda_device_index("cpu")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        trt_backend.cuda_device_index("gpu")


def test_engine_tensor_types_map_to_numpy_and_unsupported_ones_are_refused() -> None:
    assert trt_backend.numpy_dtype("HALF", "x").name == "float16"
    assert trt_backend.numpy_dtype("INT32", "x").name == "int32"
    with pytest.raises(UserError, match="BF16"):
        trt_backend.numpy_dtype("BF16", "sample")


def test_runtime_modules_do_not_import_torch_or_tensorrt() -> None:
    code = (
        "import sys, sdrt.backends.tensorrt, sdrt.engine_cache;"
        "print(sorted(m for m in ('torch', 'tensorrt', 'cuda') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the engine's device plumbing, on fakes of TensorRT and cuda-python (fake_tensorrt.py) --


@pytest.fixture
def fake_gpu(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[FakeCudart, Any]]:
    """Make a fake machine (cudart options: devices, driver, runtime) with engines built."""

    def make(**cudart_options: int) -> tuple[FakeCudart, Any]:
        cudart = FakeCudart(**cudart_options)
        trt_api = fake_runtime_api(cudart)
        monkeypatch.setattr(trt_backend, "_DEVICES", {})
        monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
        monkeypatch.setattr(trt_backend, "import_tensorrt", lambda prefer=None: trt_api)
        monkeypatch.setattr(trt_backend, "trt_logger", lambda api: "logger")
        spec = spec_for(bundle, batch=(1, 2), height=(256, 512), width=(256, 512))
        tb.write_engines(bundle, spec, fake_engine, log=lambda line: None)
        return cudart, trt_api.module

    return make


@pytest.fixture
def gpu(fake_gpu: Callable[..., tuple[FakeCudart, Any]]) -> tuple[FakeCudart, Any]:
    return fake_gpu()


def unet_feeds(side: int, value: float) -> dict[str, np.ndarray]:
    return {
        "sample": np.full((2, 4, side, side), value, np.float64),  # cast to the engine's float32
        "timestep": np.full(2, 999.0, np.float32),
        "encoder_hidden_states": np.zeros((2, 77, TEXT_DIM), np.float32),
    }


def test_run_uploads_inputs_runs_and_returns_host_arrays_after_the_stream_sync(
    bundle: Bundle, gpu: Any
) -> None:
    cudart, _ = gpu
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda")
    out = unet.run(unet_feeds(32, 1.5))
    assert set(out) == {"noise_pred"}
    assert out["noise_pred"].dtype == np.float32 and out["noise_pred"].shape == (2, 4, 32, 32)
    assert np.all(out["noise_pred"] == 3.0)  # the fake runs queued copies only at a sync
    assert cudart.queue == []


def test_buffers_are_allocated_once_per_input_shape_and_reused(bundle: Bundle, gpu: Any) -> None:
    cudart, _ = gpu
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda")
    unet.run(unet_feeds(32, 1.0))
    after_first, pinned = cudart.mallocs, len(cudart.pinned)
    unet.run(unet_feeds(32, 2.0))
    assert (cudart.mallocs, len(cudart.pinned)) == (after_first, pinned)
    out = unet.run(unet_feeds(64, 2.0))
    assert cudart.mallocs == after_first + 4  # three inputs and one output for the new shape
    assert len(cudart.pinned) == pinned + 4  # and their pinned host twins
    assert out["noise_pred"].shape == (2, 4, 64, 64) and np.all(out["noise_pred"] == 4.0)
    unet.close()
    assert cudart.pinned == {}


def test_per_unet_step_only_sample_and_timestep_go_up_from_pinned_memory(
    bundle: Bundle, gpu: Any
) -> None:
    cudart, module = gpu
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda", cuda_graph=True)
    text = np.full((2, 77, TEXT_DIM), 0.25, np.float32)
    cond = upload_constants(unet, {"encoder_hidden_states": text})  # what Pipeline calls
    assert len(cudart.uploads) == 1  # the embeddings, once per request
    for step in range(4):
        before = len(cudart.uploads)
        feeds = unet_feeds(32, float(step))
        del feeds["encoder_hidden_states"]
        out = unet.run({**feeds, **cond})["noise_pred"]
        assert cudart.uploads[before:] == [True, True]  # sample and timestep, both pinned
        assert np.all(out == 2.0 * step + 0.25)  # the fake U-Net adds the embeddings' first value
    context = module.engines[0].contexts[0]
    assert context.addresses["encoder_hidden_states"] == cond["encoder_hidden_states"].pointer


def test_a_new_requests_conditioning_is_rebound_not_replayed_from_the_old_graph(
    bundle: Bundle, gpu: Any
) -> None:
    cudart, _ = gpu
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda", cuda_graph=True)
    feeds = unet_feeds(32, 1.0)
    del feeds["encoder_hidden_states"]
    for first_value in (0.5, 0.75):  # two requests, each with its own uploaded conditioning
        text = np.full((2, 77, TEXT_DIM), first_value, np.float32)
        cond = upload_constants(unet, {"encoder_hidden_states": text})
        outputs = [unet.run({**feeds, **cond})["noise_pred"][0, 0, 0, 0] for _ in range(3)]
        assert outputs == [2.0 + first_value] * 3
        del cond  # the request ends; its device memory is freed at the next run
    assert cudart.launches == 4  # each request: one plain run, then capture + launch, replay


def test_cuda_graph_is_captured_after_one_plain_run_and_replayed_with_new_inputs(
    bundle: Bundle, gpu: Any
) -> None:
    cudart, module = gpu
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda", cuda_graph=True)
    results = [unet.run(unet_feeds(32, v))["noise_pred"][0, 0, 0, 0] for v in (1.0, 2.0, 3.0)]
    assert results == [2.0, 4.0, 6.0]
    assert cudart.launches == 2  # second run captured then launched, third replayed
    assert module.engines[0].contexts[0].enqueues == 2  # plain run + the captured one
    unet.run(unet_feeds(64, 1.0))  # a new shape runs plainly first, then gets its own graph
    assert cudart.launches == 2
    assert unet.run(unet_feeds(64, 5.0))["noise_pred"][0, 0, 0, 0] == 10.0
    assert cudart.launches == 3


def test_engines_share_one_scratch_sized_to_the_largest(bundle: Bundle, gpu: Any) -> None:
    cudart, module = gpu
    text = trt_backend.TensorRTEngine(bundle, "text_encoder", "cuda")
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda")
    assert text.device is unet.device
    ids = np.arange(2 * 77, dtype=np.int64).reshape(2, 77)
    embeddings = text.run({"input_ids": ids})["text_embeddings"]
    assert embeddings.shape == (2, 77, TEXT_DIM) and embeddings[0, 1, 0] == 1.0
    unet.run(unet_feeds(32, 1.0))
    text.run({"input_ids": ids})  # rebinds to the grown scratch
    assert unet.device.scratch_size == 5000
    scratch = {engine.contexts[0].scratch for engine in module.engines}
    assert scratch == {(unet.device.scratch_ptr, 5000)}


def test_a_graph_captured_before_the_scratch_grew_is_not_replayed(bundle: Bundle, gpu: Any) -> None:
    cudart, _ = gpu
    text = trt_backend.TensorRTEngine(bundle, "text_encoder", "cuda", cuda_graph=True)
    ids = np.arange(2 * 77, dtype=np.int64).reshape(2, 77)
    for _ in range(3):
        text.run({"input_ids": ids})
    assert cudart.launches == 2  # captured on the 1000-byte scratch
    generation = text.device.generation
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda")
    unet.run(unet_feeds(32, 1.0))  # the bigger engine frees that scratch for a 5000-byte one
    assert text.device.generation == generation + 1
    again = text.run({"input_ids": ids + 1})["text_embeddings"]  # the fake faults on freed scratch
    assert again[0, 1, 0] == 2.0
    assert cudart.launches == 2  # ran plainly on the new scratch; the stale graph is gone


def test_every_allocation_deserialization_and_launch_happens_on_the_requested_device(
    bundle: Bundle, fake_gpu: Callable[..., tuple[FakeCudart, Any]]
) -> None:
    cudart, module = fake_gpu(devices=2)  # the fake fails any use of memory from another GPU
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda:1", cuda_graph=True)
    text = trt_backend.TensorRTEngine(bundle, "text_encoder", "cuda:0")  # makes cuda:0 current
    assert (unet.device.index, text.device.index, cudart.current) == (1, 0, 0)
    cond = upload_constants(unet, {"encoder_hidden_states": np.zeros((2, 77, TEXT_DIM))})
    feeds = {k: v for k, v in unet_feeds(32, 1.0).items() if k != "encoder_hidden_states"}
    for _ in range(3):  # load, plain run, capture, replay; the text encoder switches to 0 each time
        text.run({"input_ids": np.zeros((2, 77), np.int64)})
        unet.run({**feeds, **cond})
    assert {engine.output: engine.device for engine in module.engines} == {
        "text_embeddings": 0,
        "noise_pred": 1,
    }
    assert cudart.owner[cond["encoder_hidden_states"].pointer] == 1
    assert {device for call, device in cudart.events if call == "cudaGraphLaunch"} == {1}


def test_a_request_outside_every_profile_fails_before_touching_the_device(
    bundle: Bundle, gpu: Any
) -> None:
    cudart, _ = gpu
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda")
    with pytest.raises(UserError, match="no built unet engine accepts.*outside 32..64"):
        unet.run(unet_feeds(80, 1.0))
    assert cudart.mallocs == 0


def test_a_driver_older_than_the_cuda_runtime_is_refused_naming_both_and_the_fix(
    bundle: Bundle, fake_gpu: Callable[..., tuple[FakeCudart, Any]]
) -> None:
    fake_gpu(driver=12040, runtime=13000)
    with pytest.raises(UserError) as err:
        trt_backend.TensorRTEngine(bundle, "unet", "cuda")
    message = str(err.value)
    assert "CUDA 12.4" in message and "CUDA 13.0 runtime" in message
    assert "pip install 'sdrt[tensorrt-cu12]'" in message and "nvidia-smi" in message


def test_a_cuda_11_driver_is_told_to_update(
    bundle: Bundle, fake_gpu: Callable[..., tuple[FakeCudart, Any]]
) -> None:
    fake_gpu(driver=11080, runtime=12080)
    with pytest.raises(UserError, match=r"CUDA 11\.8, older .* update the driver \(TensorRT 10"):
        trt_backend.TensorRTEngine(bundle, "unet", "cuda")


def test_each_tensorrt_extra_pins_cuda_python_to_its_cuda_major_version() -> None:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    for major in trt_backend.CUDA_EXTRAS:
        requirements = {Requirement(r).name: Requirement(r) for r in extras[f"tensorrt-cu{major}"]}
        assert f"tensorrt-cu{major}" in requirements
        cuda_python = requirements["cuda-python"].specifier
        assert cuda_python.contains(f"{major}.9") and not cuda_python.contains(f"{major + 1}.0")
        assert not cuda_python.contains(f"{major - 1}.9")
    assert extras["tensorrt"] == ["sdrt[tensorrt-cu13]"]


def test_an_older_driver_of_the_same_major_version_runs_with_a_warning(
    bundle: Bundle, fake_gpu: Callable[..., tuple[FakeCudart, Any]]
) -> None:
    fake_gpu(driver=12020, runtime=12080)
    with pytest.warns(RuntimeWarning, match=r"CUDA 12\.2, older than the CUDA 12\.8 runtime"):
        unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda")
    assert np.all(unet.run(unet_feeds(32, 1.0))["noise_pred"] == 2.0)


def test_no_driver_at_all_is_refused(
    bundle: Bundle, fake_gpu: Callable[..., tuple[FakeCudart, Any]]
) -> None:
    fake_gpu(driver=0)
    with pytest.raises(UserError, match="no NVIDIA driver is installed here"):
        trt_backend.TensorRTEngine(bundle, "unet", "cuda")


# ---- the builder's use of TensorRT 10 and 11, on fakes that record the calls ----------------


@pytest.fixture(params=sorted(TRT_VERSIONS))
def trt_major(request: pytest.FixtureRequest) -> str:
    """Each builder test runs against the TensorRT 10 fake and the TensorRT 11 fake."""
    return str(request.param)


def fake_builder(
    api: FakeBuildAPI, backend: str = "tensorrt", cache: Path | None = None, **options: Any
) -> tb.TensorRTBuilder:
    trt_api = trt_backend.TensorRT(api.module(), backend, backend)
    return tb.TensorRTBuilder(
        trt_api,
        timing_cache=cache,
        workspace_gb=options.get("workspace_gb"),
        optimization_level=options.get("optimization_level", 3),
        log=lambda line: None,
    )


@pytest.fixture
def quiet_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "trt_logger", lambda api: "logger")


SCALE = 30000.0  # pushes one intermediate past a quarter of fp16's range: it must stay fp32


def write_tiny_unet(path: Path) -> Path:
    """A real fp32 ONNX with the U-Net's inputs: noise_pred = (sample * 3e4) / 3e4 + sample / 2,
    whose Mul/Div pair the fp16 policy must keep in fp32."""
    import onnx
    from onnx import TensorProto, helper

    def value(name: str, shape: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    latent = ["unet_batch", 4, "latent_height", "latent_width"]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["sample", "scale"], ["scaled"], name="scale_up"),
            helper.make_node("Div", ["scaled", "scale"], ["unscaled"], name="scale_down"),
            helper.make_node("Mul", ["sample", "half"], ["halved"], name="halve"),
            helper.make_node("Add", ["unscaled", "halved"], ["noise_pred"], name="add"),
        ],
        "tiny_unet",
        [
            value("sample", latent),
            value("timestep", ["unet_batch"]),
            value("encoder_hidden_states", ["unet_batch", 77, TEXT_DIM]),
        ],
        [value("noise_pred", latent)],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [SCALE]),
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def unet_onnx(tmp_path: Path) -> Path:
    return write_tiny_unet(tmp_path / "unet.onnx")


def unet_job(
    bundle: Bundle, onnx_path: Path, onnx_precision: str = "fp32", precision: str = "fp16"
) -> tb.BuildJob:
    profile = spec_for(bundle).components["unet"].profile
    workdir = onnx_path.parent / "staging"
    workdir.mkdir(exist_ok=True)
    return tb.BuildJob("unet", onnx_path, onnx_precision, precision, profile, bundle, workdir)


@pytest.fixture
def noise_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """N(0, 1) feeds at the profile minimum: the placeholder bundle has no text encoder to run
    (`test_calibration_of_a_converted_unet_is_the_bundles_own_conditioning` covers that)."""

    def feeds(bundle: Bundle, component: str, profile: Any) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(0)
        return [{n: rng.standard_normal(r.min).astype(np.float32) for n, r in profile.items()}]

    monkeypatch.setattr(tb, "calibration_feeds", feeds)


UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states"]


def test_an_fp32_onnx_becomes_fp16_by_the_same_conversion_on_10_and_11(
    bundle: Bundle, unet_onnx: Path, trt_major: str, quiet_logger: None, noise_calibration: None
) -> None:
    """TensorRT 10's weak typing (BuilderFlag.FP16) is never used: it may lower what the
    conversion keeps fp32 (the timestep embedding, values past the fp16 range)."""
    import onnx

    api = FakeBuildAPI(UNET_INPUTS, trt_major)
    job = unet_job(bundle, unet_onnx)
    built = fake_builder(api, workspace_gb=2, optimization_level=5)(job)
    assert bytes(built.data) == b"serialized"
    assert ("pool", "WORKSPACE", 2 * 2**30) in api.calls
    assert ("optimization level", 5) in api.calls
    shapes = {call[1]: call[2:] for call in api.calls if call[0] == "shape"}
    assert shapes["sample"] == ((2, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert set(shapes) == set(UNET_INPUTS)
    assert built.fp16_source == "converted at build time, 2 nodes kept fp32"
    assert ("network flags", 1 << FakeBuildAPI.STRONGLY_TYPED) in api.calls
    assert not any(call[0] == "flag" for call in api.calls)
    [(path, data)] = api.parsed
    assert Path(path).parent.parent == job.workdir  # a temporary folder in the staging directory
    assert list(job.workdir.iterdir()) == []  # and gone once the engine is built
    graph = onnx.load_model_from_string(data).graph
    types = {t.name: t.data_type for t in graph.initializer}
    assert types["scale"] == onnx.TensorProto.FLOAT and types["half"] == onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.FLOAT] * 3


def test_a_failed_build_from_a_converted_onnx_leaves_no_file_behind(
    bundle: Bundle, unet_onnx: Path, quiet_logger: None, noise_calibration: None
) -> None:
    api = FakeBuildAPI(UNET_INPUTS, "11", build_ok=False)
    job = unet_job(bundle, unet_onnx)
    with pytest.raises(UserError, match="could not build unet"):
        fake_builder(api)(job)
    assert api.parsed and list(job.workdir.iterdir()) == []


def test_an_onnx_already_in_the_wanted_precision_is_built_strongly_typed(
    bundle: Bundle, unet_onnx: Path, trt_major: str, quiet_logger: None
) -> None:
    api = FakeBuildAPI(UNET_INPUTS, trt_major)
    fp16 = fake_builder(api)(unet_job(bundle, unet_onnx, onnx_precision="fp16"))
    fp32 = fake_builder(api)(unet_job(bundle, unet_onnx, precision="fp32"))
    assert (fp16.fp16_source, fp32.fp16_source) == ("bundle fp16 ONNX", None)
    assert api.calls.count(("network flags", 1 << FakeBuildAPI.STRONGLY_TYPED)) == 2
    assert not any(call[0] == "flag" for call in api.calls)
    assert [path for path, _ in api.parsed] == [str(unet_onnx)] * 2


def test_tensorrt_rtx_converts_an_fp32_onnx_like_tensorrt_11(
    bundle: Bundle, unet_onnx: Path, quiet_logger: None, noise_calibration: None
) -> None:
    api = FakeBuildAPI(UNET_INPUTS, "10")  # even where its BuilderFlag had FP16
    built = fake_builder(api, backend="tensorrt-rtx")(unet_job(bundle, unet_onnx))
    assert built.fp16_source == "converted at build time, 2 nodes kept fp32"
    assert not any(call[0] == "flag" for call in api.calls)


def test_the_timing_cache_is_loaded_before_and_saved_after_each_build(
    bundle: Bundle, unet_onnx: Path, tmp_path: Path, trt_major: str, quiet_logger: None
) -> None:
    cache = tmp_path / "caches" / "h100.timing-cache"
    api = FakeBuildAPI(UNET_INPUTS, trt_major)
    fake_builder(api, cache=cache)(unet_job(bundle, unet_onnx, onnx_precision="fp16"))
    assert ("load cache", b"") in api.calls
    saved = cache.read_bytes()
    assert saved.startswith(b"timings after")
    second = FakeBuildAPI(UNET_INPUTS, trt_major)
    fake_builder(second, cache=cache)(unet_job(bundle, unet_onnx, onnx_precision="fp16"))
    assert ("load cache", saved) in second.calls  # a new build starts from the saved cache


def test_a_timing_cache_from_another_version_is_replaced_not_fatal(
    bundle: Bundle, unet_onnx: Path, tmp_path: Path, trt_major: str, quiet_logger: None
) -> None:
    cache = tmp_path / "old.timing-cache"
    cache.write_bytes(b"from TensorRT 10.9")
    api = FakeBuildAPI(UNET_INPUTS, trt_major, timing_cache_valid=False)
    fake_builder(api, cache=cache)(unet_job(bundle, unet_onnx, onnx_precision="fp16"))
    loads = [call[1] for call in api.calls if call[0] == "load cache"]
    assert loads == [b"from TensorRT 10.9", b""]
    assert cache.read_bytes().startswith(b"timings after")


def test_tensorrt_rtx_builds_without_a_timing_cache(
    bundle: Bundle, unet_onnx: Path, tmp_path: Path, quiet_logger: None
) -> None:
    cache = tmp_path / "rtx.timing-cache"
    api = FakeBuildAPI(UNET_INPUTS)
    job = unet_job(bundle, unet_onnx, onnx_precision="fp16")
    fake_builder(api, backend="tensorrt-rtx", cache=cache)(job)
    assert not any(call[0] == "load cache" for call in api.calls)
    assert not cache.exists()


def test_an_onnx_input_missing_from_the_manifest_is_refused(
    bundle: Bundle, unet_onnx: Path, trt_major: str, quiet_logger: None
) -> None:
    api = FakeBuildAPI([*UNET_INPUTS, "added_cond"], trt_major)
    with pytest.raises(UserError, match="added_cond"):
        fake_builder(api)(unet_job(bundle, unet_onnx, onnx_precision="fp16"))


def test_engine_json_and_sdrt_info_say_where_each_fp16_engine_came_from(
    bundle: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = {
        "unet": "converted at build time, 12 nodes kept fp32",
        "text_encoder": "bundle fp16 ONNX",
    }

    def builder(job: tb.BuildJob) -> tb.BuiltEngine:
        return tb.BuiltEngine(b"engine", sources.get(job.component))

    spec = spec_for(bundle, vae_precision="fp32")
    directory = tb.write_engines(bundle, spec, builder, log=lambda line: None)
    files = json.loads((directory / RECORD).read_text())["files"]
    assert files["unet"]["fp16_source"] == sources["unet"]
    assert "fp16_source" not in files["vae_decoder"]  # an fp32 engine
    assert read_entry(directory).fp16_sources["unet"] == sources["unet"]
    assert main(["info", str(bundle.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"engines        {directory.name}" in lines
    assert "  unet           fp16  converted at build time, 12 nodes kept fp32" in lines
    assert "  text_encoder   fp16  bundle fp16 ONNX" in lines
    assert "  vae_decoder    fp32" in lines


@pytest.fixture
def measured_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where onnxruntime-gpu measures: the opt shapes, the deployment size."""
    from sdrt.export import fp16_onnx

    providers = [fp16_onnx.CUDA, "CPUExecutionProvider"]
    monkeypatch.setattr(fp16_onnx, "calibration_providers", lambda: providers)


def tiny_profile(bundle: Bundle, component: str) -> Any:
    sizes = tb.size_ranges(batch=(1, 2), height=(64, 128), width=(64, 128), opt=(128, 64))
    dims = tb.component_dims(component, sizes, int(bundle.manifest["vae_scale_factor"]))
    return tb.component_profile(bundle.components[component], dims)


def test_calibration_ids_for_text_encoders_are_the_calibration_prompts(
    tiny_bundle: Path, measured_on_cuda: None
) -> None:
    from sdrt.export.calibration import PROMPTS
    from sdrt.export.fp16_onnx import calibration_feeds
    from sdrt.tokenizer import ClipTokenizer

    bundle = Bundle.load(tiny_bundle)
    [feeds] = calibration_feeds(bundle, "text_encoder", tiny_profile(bundle, "text_encoder"))
    tokenizer = ClipTokenizer.from_dir(bundle.tokenizer_dirs()["text_encoder"])
    want = tokenizer.encode(["", PROMPTS[0]], 77)  # opt: one image with guidance
    [spec] = bundle.components["text_encoder"].inputs
    assert feeds["input_ids"].dtype == np.dtype(spec["dtype"])
    np.testing.assert_array_equal(feeds["input_ids"], want)


def test_calibration_of_a_converted_unet_is_the_bundles_own_conditioning(
    tiny_bundle: Path, measured_on_cuda: None
) -> None:
    """Not N(0, 1) states: the bundle's text encoder on the calibration prompts, as generation
    computes them, at the engine's opt size, at timesteps across the schedule."""
    from sdrt import Pipeline
    from sdrt.export.calibration import PROMPTS, TIMESTEPS
    from sdrt.export.fp16_onnx import calibration_feeds

    bundle = Bundle.load(tiny_bundle)
    feeds = calibration_feeds(bundle, "unet", tiny_profile(bundle, "unet"))
    pipe = Pipeline.load(tiny_bundle, device="cpu")
    assert [float(f["timestep"][0]) for f in feeds] == [np.float32(t) for t in TIMESTEPS]
    for index, feed in enumerate(feeds):
        prompt = PROMPTS[index % len(PROMPTS)]
        hidden = pipe.family.encode_text(pipe, ["", prompt])["encoder_hidden_states"]
        assert feed["sample"].shape == (2, 4, 16, 8)  # opt: one image of 128x64, guided
        assert feed["encoder_hidden_states"].dtype == np.float32
        np.testing.assert_allclose(feed["encoder_hidden_states"], hidden, rtol=0, atol=1e-6)


def test_calibration_is_at_the_profile_minimum_where_the_cpu_measures(tiny_bundle: Path) -> None:
    from sdrt.export.fp16_onnx import calibration_feeds

    bundle = Bundle.load(tiny_bundle)
    feeds = calibration_feeds(bundle, "unet", tiny_profile(bundle, "unet"))
    assert feeds[0]["sample"].shape == (2, 4, 8, 8)
    [decoder] = calibration_feeds(bundle, "vae_decoder", tiny_profile(bundle, "vae_decoder"))
    scale = bundle.manifest["vae_scaling_factor"]
    assert decoder["latent"].shape == (1, 4, 8, 8)
    assert decoder["latent"].std() == pytest.approx(1 / scale, rel=0.25)


@pytest.mark.parametrize("major", sorted(TRT_VERSIONS))
def test_sdrt_build_on_an_exported_bundle_with_tensorrt_10_and_11(
    tiny_bundle: Path,
    tmp_path: Path,
    major: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The whole build on a real fp32 export, on 10 as on 11: every fp16 engine comes from an
    fp16 copy of its ONNX, converted with the measured policy (the timestep embedding fp32)
    and gone afterwards."""
    import shutil

    import onnx

    root = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    exported = Bundle.load(root)
    api = FakeBuildAPI(None, major)
    trt_api = trt_backend.TensorRT(api.module(), "tensorrt", "tensorrt")
    monkeypatch.setattr(tb, "import_tensorrt", lambda prefer=None: trt_api)
    monkeypatch.setattr(tb, "import_cudart", lambda: FakeCudart())
    monkeypatch.setattr(trt_backend, "_DEVICES", {})
    monkeypatch.setattr(tb, "trt_logger", lambda api: "logger")
    directory = tb.build_engines(root, batch=(1, 1), static=(64, 64), progress=False)
    sources = read_entry(directory).fp16_sources
    assert set(sources) == set(exported.components)  # tiny VAEs stay fp16 ("auto")
    assert not any(call[0] == "flag" for call in api.calls)  # no BuilderFlag.FP16 on 10
    for name, source in sources.items():
        assert source.startswith("converted at build time, ") and source.endswith(" kept fp32")
        [data] = [d for path, d in api.parsed if Path(path).name == f"{name}.onnx"]
        floats = {t.data_type for t in onnx.load_model_from_string(data).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in floats, name
    [unet] = [d for path, d in api.parsed if Path(path).name == "unet.onnx"]
    typed = onnx.shape_inference.infer_shapes(onnx.load_model_from_string(unet))
    types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
    sines = [n.output[0] for n in typed.graph.node if n.op_type in ("Sin", "Cos")]
    assert sines and {types[name] for name in sines} == {onnx.TensorProto.FLOAT}
    assert sorted(p.name for p in (root / ENGINES_DIR).iterdir() if p.is_dir()) == [directory.name]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [RECORD, *(f"{name}.engine" for name in exported.components)]
    )
    assert main(["info", str(root)]) == 0
    assert f"  unet           fp16  {sources['unet']}" in capsys.readouterr().out.splitlines()


def test_lora_banks_are_bound_once_by_address_and_rows_update_in_place(
    bundle: Bundle, gpu: Any
) -> None:
    """`bind_banks` (the adapter pool) on the fake GPU. The fake U-Net adds the first value of
    its encoder_hidden_states buffer, so a bank bound under that name shows what the kernel
    reads through the bound address: a write of rows reaches the next run and the replayed
    CUDA graph, with no new allocation, rebinding or recapture."""
    cudart, module = gpu
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda", cuda_graph=True)
    bank = np.zeros((2, 77, TEXT_DIM), np.float32)
    changed = unet.bind_banks({"encoder_hidden_states": bank})
    feeds = unet_feeds(32, 1.0)
    del feeds["encoder_hidden_states"]
    assert [unet.run(feeds)["noise_pred"][0, 0, 0, 0] for _ in range(3)] == [2.0] * 3
    mallocs, launches = cudart.mallocs, cudart.launches
    address = module.engines[0].contexts[0].addresses["encoder_hidden_states"]
    bank[0, 0, :] = 0.5  # an adapter loaded into rows of the pool
    bank[1] = 9.0  # written but not reported: stays on the host
    changed("encoder_hidden_states", slice(0, 1))
    assert cudart.uploads[-1] is False  # one pageable copy of those rows only
    assert unet.run(feeds)["noise_pred"][0, 0, 0, 0] == 2.5
    assert cudart.mallocs == mallocs and cudart.launches == launches + 1  # graph replayed
    assert module.engines[0].contexts[0].addresses["encoder_hidden_states"] == address
    device_copy = np.frombuffer(bytes(cudart.live(address)), np.float32).reshape(bank.shape)
    assert np.all(device_copy[0] == bank[0]) and np.all(device_copy[1] == 0.0)


def test_a_lora_pool_larger_than_the_engines_take_is_refused_before_any_upload(
    bundle: Bundle, gpu: Any
) -> None:
    """The pool's bank rows follow max_loras; an engine built for fewer is refused at bind
    time in one line naming the fix, with nothing allocated on the device."""
    cudart, _ = gpu
    unet = trt_backend.TensorRTEngine(bundle, "unet", "cuda", cuda_graph=True)
    rows = max(
        e.spec.components["unet"].profile["encoder_hidden_states"].max[0] for e in unet.entries
    )
    mallocs = cudart.mallocs
    with pytest.raises(UserError, match=r"rebuild them with `sdrt build --max-loras N`") as err:
        unet.bind_banks({"encoder_hidden_states": np.zeros((rows + 1, 77, TEXT_DIM), np.float32)})
    assert "\n" not in str(err.value) and cudart.mallocs == mallocs and unet.bound == {}


def test_the_engines_lora_bank_range_covers_every_pool_up_to_max_loras() -> None:
    branch = {"rank": 4, "layers": {}}
    assert tb.lora_dims(branch, 8) == {"lora_rank": (1, 1, 4), "lora_bank": (8, 36, 36)}
    assert tb.lora_dims(branch)["lora_bank"][2] == 17 * 4  # serve's default, 16 slots
    assert tb.lora_dims(None, 8) == {}
    with pytest.raises(UserError, match="--max-loras must be in 1-1024, got 0"):
        tb.lora_dims(branch, 0)
    args = main_parser().parse_args(["build", "B", "--max-loras", "8"])
    assert args.max_loras == 8


@pytest.mark.parametrize("driver, extra", [(12080, "tensorrt-cu12"), (13000, "tensorrt-cu13")])
def test_tensorrt_rtx_is_refused_before_building_on_a_data_centre_gpu(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, driver: int, extra: str
) -> None:
    """TensorRT-RTX 1.7 built an engine on an H100 (compute capability 9.0), then refused to
    load it: no build time is spent on engines that cannot run."""
    api = FakeBuildAPI(None, "11")
    trt_api = trt_backend.TensorRT(api.module(), "tensorrt-rtx", "tensorrt_rtx")
    monkeypatch.setattr(tb, "import_tensorrt", lambda prefer=None: trt_api)
    monkeypatch.setattr(tb, "import_cudart", lambda: FakeCudart(driver=driver, runtime=12080))
    monkeypatch.setattr(trt_backend, "_DEVICES", {})
    monkeypatch.setattr(tb, "trt_logger", lambda api: "logger")
    with pytest.raises(UserError) as err:
        tb.build_engines(tiny_bundle, batch=(1, 1), static=(64, 64), progress=False)
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0)" in str(err.value)
    assert f"pip install 'sdrt[{extra}]'" in str(err.value)
    assert api.calls == [] and not (tiny_bundle / ENGINES_DIR).exists()
