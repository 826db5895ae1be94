"""Export: a diffusers folder becomes a verified bundle, and bad input leaves nothing behind."""

from __future__ import annotations

import json
import os

import pytest

from sdrt.bundle import Bundle, file_sha256
from sdrt.errors import UserError
from sdrt.export import bundle_writer, load


def test_manifest_records_every_component_with_hash_and_parity(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, entry in manifest["components"].items():
        assert file_sha256(tiny_bundle / entry["file"]) == entry["sha256"], name
        assert entry["parity"]["max_rel"] < 1e-4, name
    assert manifest["family"] == "sd1"
    assert manifest["scheduler"] == "pndm"
    assert manifest["size_multiple"] == 16
    tokenizer_files = {p.name for p in (tiny_bundle / "tokenizer").iterdir()}
    assert "tokenizer.json" in tokenizer_files or "vocab.json" in tokenizer_files
    Bundle.load(tiny_bundle)


def test_export_refuses_a_non_empty_destination(tiny_pipe, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="not empty"):
        bundle_writer.export_bundle(tiny_pipe, out, "sd1", progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_interrupted_export_leaves_nothing_behind(tiny_pipe, tmp_path, monkeypatch):
    calls = []

    def interrupt_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"max_abs": 0.0, "max_rel": 0.0, "finite": True}

    monkeypatch.setattr(bundle_writer, "verify_onnx", interrupt_on_second)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        bundle_writer.export_bundle(tiny_pipe, out, "sd1", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_fails_clearly_above_tolerance(tiny_pipe, tmp_path):
    with pytest.raises(UserError, match="differs from PyTorch"):
        bundle_writer.export_bundle(tiny_pipe, tmp_path / "b", "sd1", tolerance=0.0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pickle_checkpoint_is_refused_without_the_flag(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(UserError, match="--allow-pickle"):
        load.load_pipeline(str(ckpt))


def test_folder_with_only_pickle_weights_is_refused_without_the_flag(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "model", safe_serialization=False)
    with pytest.raises(UserError, match="--allow-pickle"):
        load.load_pipeline(str(tmp_path / "model"))
    assert load.load_pipeline(str(tmp_path / "model"), allow_pickle=True).unet is not None


def test_missing_model_and_unknown_preset_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load.load_pipeline(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="unknown random-weight preset"):
        load.load_pipeline(None, random_weights="sd99")


def test_ort_cuda_options_fused_attention_fp16_and_static_variants(
    tiny_pipe, tmp_path, monkeypatch
):
    import shutil

    import numpy as np
    import onnx

    from sdrt import Pipeline
    from sdrt.export import onnx_export
    from sdrt.export.calibration import TIMESTEPS
    from sdrt.export.optimize import count_nodes
    from sdrt.export.parity import run_diffusers
    from sdrt.export.tensorrt_build import build_engines

    calibrated = []
    measure = onnx_export.keep_fp32_nodes
    monkeypatch.setattr(
        onnx_export,
        "keep_fp32_nodes",
        lambda model, feeds, **kw: calibrated.append(len(feeds)) or measure(model, feeds, **kw),
    )
    out = tmp_path / "fast"
    manifest = bundle_writer.export_bundle(
        tiny_pipe,
        out,
        "sd1",
        dtype="fp16",
        progress=False,
        fused_attention=True,
        static_sizes=[(64, 96)],
    )
    assert manifest["fused_attention"] is True
    # text encoder: one batch of prompts; U-Net: one feed per calibration timestep; VAEs
    assert calibrated == [1, len(TIMESTEPS), 1, 1]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "unet.onnx.data").stat().st_mode & 0o777 == 0o666 & ~umask
    unet = onnx.load(str(out / "unet.onnx"))
    assert count_nodes(unet, "MultiHeadAttention", "com.microsoft") > 0
    variants = manifest["components"]["unet"]["static_variants"]
    assert variants[0]["shares_external_data"] is True
    assert variants[0]["sha256"] == file_sha256(out / variants[0]["file"])  # graph alone
    assert [v["dims"] for v in variants] == [
        {"unet_batch": 2, "latent_height": 8, "latent_width": 12}
    ]
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 12), np.float32)
    call = {
        "num_inference_steps": 4,
        "height": 64,
        "width": 96,
        "latents": latents,
        "output_type": "np",
        "scheduler": "ddim",
    }
    fast = Pipeline.load(out, device="cpu")("a cat", **call).images
    eager = run_diffusers(
        tiny_pipe, "ddim", latents, prompt="a cat", **{k: call[k] for k in ("height", "width")},
        num_inference_steps=4,
    )  # fmt: skip
    # measured 1.1e-3 against fp32 diffusers (ORT CPU, 2026-12-01); images are in [0, 1]
    assert np.abs(fast - eager).max() <= 3e-3
    with pytest.raises(UserError, match="cannot parse"):
        build_engines(out)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with (broken / variants[0]["file"]).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="does not match the sha256"):
        Bundle.load(broken)


def test_fp16_vae_that_fails_verification_is_kept_in_fp32(tiny_pipe, tmp_path, monkeypatch):
    real_verify = bundle_writer.verify_onnx

    def overflowing_fp16_vae(component, path, dims, want):
        parity = real_verify(component, path, dims, want)
        graph = onnx.load(str(path), load_external_data=False).graph
        fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
        if component.name == "vae_decoder" and fp16:
            return {**parity, "finite": False}  # what an overflowing SDXL VAE reports
        return parity

    import onnx

    monkeypatch.setattr(bundle_writer, "verify_onnx", overflowing_fp16_vae)
    manifest = bundle_writer.export_bundle(
        tiny_pipe, tmp_path / "b", "sd1", dtype="fp16", progress=False
    )
    decoder = manifest["components"]["vae_decoder"]
    assert decoder["precision"] == "fp32"
    assert "kept in fp32" in decoder["precision_note"]
    assert manifest["components"]["unet"]["precision"] == "fp16"
