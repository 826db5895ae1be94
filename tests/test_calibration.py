"""The fp16 policy measures on inputs like deployment's: real prompts' token ids and
embeddings, timesteps across the schedule, the deployment size where the CUDA provider can
afford it; SD 2.x's upcast attention keeps its scores fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from sdrt.export import bundle_writer, calibration, onnx_export
from sdrt.export.calibration import (
    PROMPTS,
    TIMESTEPS,
    attention_score_nodes,
    calibration_feeds,
    token_ids,
)
from sdrt.export.onnx_export import components, export_onnx, trace_dims


@pytest.fixture(scope="module")
def parts(tiny_pipe):
    return {c.name: c for c in components(tiny_pipe)}, trace_dims(4, 100, 8)


def test_text_encoder_is_measured_on_real_prompts(tiny_pipe, parts):
    by_name, dims = parts
    (feeds,) = calibration_feeds(tiny_pipe, by_name["text_encoder"], dims, (8, 8))
    ids = feeds["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (3, tiny_pipe.tokenizer.model_max_length)
    np.testing.assert_array_equal(ids, token_ids(tiny_pipe.tokenizer, ["", *PROMPTS]))


def test_unet_is_measured_on_the_text_encoders_embeddings_at_every_timestep(tiny_pipe, parts):
    by_name, dims = parts
    feeds = calibration_feeds(tiny_pipe, by_name["unet"], dims, (12, 16))
    assert [f["timestep"][0] for f in feeds] == pytest.approx(TIMESTEPS)
    assert max(TIMESTEPS) >= 999 and min(TIMESTEPS) < 2  # both ends of the schedule
    assert any(t != int(t) for t in TIMESTEPS)  # fractional, as Karras / Euler give
    ids = token_ids(tiny_pipe.tokenizer, ["", PROMPTS[0], "", PROMPTS[1]])
    with torch.no_grad():
        want = tiny_pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    for feed in feeds:
        np.testing.assert_array_equal(feed["encoder_hidden_states"], want)  # not N(0, 1)
        assert feed["sample"].shape == (4, 4, 12, 16)  # the latent size asked for


def test_vae_decoder_is_measured_at_the_scale_the_pipeline_feeds_it(tiny_pipe, parts):
    by_name, dims = parts
    (feeds,) = calibration_feeds(tiny_pipe, by_name["vae_decoder"], dims, (8, 8))
    scaling = tiny_pipe.vae.config.scaling_factor
    assert feeds["latent"].shape[2:] == (8, 8)
    assert feeds["latent"].std() == pytest.approx(1 / scaling, rel=0.25)


def test_deployment_size_where_the_cuda_provider_measures(monkeypatch):
    dims = {"latent_height": 16, "latent_width": 16}
    size = bundle_writer.calibration_latent_size
    monkeypatch.setattr(bundle_writer, "calibration_providers", lambda: ["CPUExecutionProvider"])
    assert size([(512, 768)], 512, 8, dims) == (16, 16)  # the CPU: the trace size
    monkeypatch.setattr(
        bundle_writer, "calibration_providers", lambda: [calibration.CUDA, "CPUExecutionProvider"]
    )
    assert size([(512, 768)], 512, 8, dims) == (64, 96)  # the first static size
    assert size([], 768, 8, dims) == (96, 96)  # else the native size


def test_calibration_providers_prefer_cuda(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [calibration.CUDA, "CPU"])
    assert calibration.calibration_providers()[0] == calibration.CUDA
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert calibration.calibration_providers() == ["CPUExecutionProvider"]


def test_fp16_export_uses_the_calibration_and_keeps_upcast_attention_scores_fp32(
    tiny_pipe, parts, tmp_path, monkeypatch
):
    by_name, dims = parts
    unet = by_name["unet"]
    unet.calibration = calibration_feeds(tiny_pipe, unet, dims, (4, 4))
    unet.upcast_attention = True
    seen = {}
    real = onnx_export.keep_fp32_nodes

    def spy(model, feeds, **options):
        seen.update(feeds=feeds, **options)
        return real(model, feeds, **options)

    monkeypatch.setattr(onnx_export, "keep_fp32_nodes", spy)
    try:
        export_onnx(unet, dims, tmp_path / "unet.onnx", "fp16")
    finally:
        unet.calibration, unet.upcast_attention = [], False
    assert seen["feeds"] is not None and len(seen["feeds"]) == len(TIMESTEPS)
    model = onnx.shape_inference.infer_shapes(onnx.load(tmp_path / "unet.onnx"))
    scores = attention_score_nodes(model)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 8  # the tiny U-Net's attention modules
    assert {n.op_type for n in model.graph.node if n.name in scores} >= {"Softmax", "MatMul"}
    assert seen["always"] == scores
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for node in softmaxes:
        assert types[node.output[0]] == TensorProto.FLOAT, node.name


def test_measuring_sessions_on_cuda_choose_cudnn_algorithms_heuristically(tmp_path, monkeypatch):
    """The default exhaustive search would time every algorithm again in each session."""
    import onnxruntime as ort

    from sdrt.export.optimize import _stats_session

    made = []
    monkeypatch.setattr(
        ort, "InferenceSession", lambda path, options, providers: made.append(providers)
    )
    graph = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    _stats_session(graph, tmp_path, [calibration.CUDA, "CPUExecutionProvider"])
    _stats_session(graph, tmp_path, ["CPUExecutionProvider"])
    (cuda, options), cpu = made[0]
    assert (cuda, cpu) == (calibration.CUDA, "CPUExecutionProvider")
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert made[1] == ["CPUExecutionProvider"]


@pytest.mark.parametrize("free_units, split", [(100, False), (0.5, True)])
def test_measuring_sessions_are_split_by_device_memory_on_cuda(
    tiny_pipe, parts, tmp_path, monkeypatch, free_units, split
):
    """At the deployment size the measurement's memory grows with the inputs; on the CUDA
    provider that is the device's memory, not the host's RAM, which sizes the split."""
    from sdrt.export.external_data import external_bytes
    from sdrt.export.memory_estimate import PASS_EXTRA_BYTES

    by_name, dims = parts
    unet = by_name["unet"]
    unet.calibration = calibration_feeds(tiny_pipe, unet, dims, (16, 16))  # above the trace size
    seen = {}

    def spy(model, feeds, **options):
        seen.update(options, weights=external_bytes(model))
        return []

    monkeypatch.setattr(onnx_export, "keep_fp32_nodes", spy)
    monkeypatch.setattr(onnx_export, "calibration_providers", lambda: [calibration.CUDA])
    monkeypatch.setattr(calibration, "calibration_providers", lambda: [calibration.CUDA])
    weights = sum(p.numel() * 4 for p in unet.module.parameters())
    free = weights + int(free_units * PASS_EXTRA_BYTES)
    monkeypatch.setattr(calibration, "cuda_free_bytes", lambda: free)
    try:
        export_onnx(unet, dims, tmp_path / "unet.onnx", "fp16")
    finally:
        unet.calibration = []
    assert calibration.measuring_room(seen["weights"]) == pytest.approx(free_units, rel=0.01)
    assert (seen["chunk"] is not None) == split
    monkeypatch.setattr(calibration, "calibration_providers", lambda: ["CPUExecutionProvider"])
    assert calibration.measuring_room(seen["weights"]) == 1.0  # host RAM: the trace size's
