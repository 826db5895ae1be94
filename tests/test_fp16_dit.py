"""fp16 export of diffusion transformers uses the measured keep-fp32 policy. T5 is the known
case: its feed-forward output leaves the fp16 range (transformers keeps T5's `wo` in fp32 by a
hand list); here a T5 whose last `wo` is scaled to do the same is exported, and the policy
finds that node by measurement."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdrt.export.calibration import calibration_feeds
from sdrt.export.families.text_encoders import text_encoder_components, vocab_size
from sdrt.export.load import random_pipeline
from sdrt.export.onnx_export import (
    TOLERANCE,
    export_onnx,
    reference_outputs,
    trace_dims,
    verify_onnx,
)
from sdrt.export.optimize import convert_fp16

WO = "block.1/layer.1/DenseReluDense/wo/MatMul"  # the last feed-forward output projection


@pytest.fixture(scope="module")
def overflowing_t5():
    """tiny-sd3's T5 with its last `wo` scaled: ~9e4 on real prompts, past fp16's 65504."""
    pipe = random_pipeline("tiny-sd3")
    wo = pipe.text_encoder_3.encoder.block[-1].layer[-1].DenseReluDense.wo
    with torch.no_grad():
        wo.weight *= 3e4
    (t5,) = [c for c in text_encoder_components(pipe, 16) if c.name == "text_encoder_3"]
    dims = trace_dims(4, vocab_size(pipe), 8)
    t5.calibration = calibration_feeds(pipe, t5, dims, (4, 4))
    return t5, dims


def _node(model: onnx.ModelProto, suffix: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.name.endswith(suffix)]
    return node


def test_the_policy_keeps_t5s_overflowing_projection_in_fp32(overflowing_t5, tmp_path):
    t5, dims = overflowing_t5
    check = {**dims, "batch": 2}
    want = reference_outputs(t5, check)
    path = tmp_path / "t5.onnx"
    export_onnx(t5, dims, path, "fp16")
    parity = verify_onnx(t5, path, check, want)
    assert parity["finite"] and parity["max_rel"] <= TOLERANCE["fp16"]  # measured 1.2e-3
    model = onnx.load(str(path))
    weights = {i.name: i.data_type for i in model.graph.initializer}
    wo_weight = _node(model, WO).input[1]
    assert weights[wo_weight] == onnx.TensorProto.FLOAT  # kept fp32 by measurement
    assert onnx.TensorProto.FLOAT16 in weights.values()  # the rest did become fp16


def test_converting_that_t5_without_the_policy_overflows(overflowing_t5, tmp_path):
    t5, dims = overflowing_t5
    path = tmp_path / "t5-fp32.onnx"
    export_onnx(t5, dims, path, "fp32")
    naive = convert_fp16(onnx.load(str(path)))
    wo = _node(naive, WO).output[0]
    naive.graph.output.append(
        onnx.helper.make_tensor_value_info(wo, onnx.TensorProto.FLOAT16, None)
    )
    session = ort.InferenceSession(naive.SerializeToString(), providers=["CPUExecutionProvider"])
    _, projected = session.run(None, t5.calibration[0])
    assert np.isinf(projected).any()  # what the policy's fp32 node avoids
