"""Export with the weights left on disk (full-size diffusion transformers): a random-weight
preset written as a diffusers folder shard by shard, modules built without memory, the graph
traced on placeholders and converted, measured and verified a segment at a time. Checked on
tiny models cut into many segments: the bundle matches diffusers run on the same folder."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from test_pipeline_dit import PROMPTS, eager, packed
from test_pipeline_variants import noise

from sdrt import Pipeline
from sdrt.errors import UserError
from sdrt.export import load, streamed_export
from sdrt.export.bundle_writer import export_bundle
from sdrt.export.calibration import calibration_feeds
from sdrt.export.families.text_encoders import text_encoder_components, vocab_size
from sdrt.export.lazy_weights import is_lazy, weights_while_called
from sdrt.export.onnx_export import (
    TOLERANCE,
    compare,
    reference_outputs,
    trace_dims,
    weightless_trace,
)
from sdrt.export.presets import PRESETS
from sdrt.export.random_folder import write_random_folder

SEGMENT = 60_000  # bytes of fp32 weights per segment: the tiny transformers cut into many
# Max abs image difference against diffusers on the same folder; measured 1.2e-6 (fp32).
IMAGE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """preset -> its random-weight diffusers folder, written once each."""
    made = {}

    def write(preset):
        if preset not in made:
            made[preset] = tmp_path_factory.mktemp("folders") / preset
            write_random_folder(preset, made[preset], progress=False)
        return made[preset]

    return write


def test_the_random_folder_is_a_diffusers_folder_in_bf16_shards(folder):
    path = folder("tiny-flux")
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    built = load.random_pipeline("tiny-flux")
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        index = json.loads(next((path / name).glob("*.index.json")).read_text())
        ours = dict(getattr(pipe, name).named_parameters())
        assert set(index["weight_map"]) == set(ours)
        (shard,) = set(index["weight_map"].values())
        with safe_open(str(path / name / shard), framework="pt") as f:
            key = next(iter(f.keys()))
            assert f.get_tensor(key).dtype == torch.bfloat16  # as published checkpoints ship
        for key, param in getattr(built, name).named_parameters():
            if param.numel() > 64 and param.std() > 0:  # each model's own init, not N(0, 1)
                assert abs(ours[key].float().std() / param.std() - 1) < 0.35, key


def _bundle(folder_path, out, dtype="fp32"):
    family = PRESETS[folder_path.name]["family"]
    with load.opened_pipeline(str(folder_path), lazy=True) as pipe:
        assert is_lazy(pipe.transformer)
        assert all(p.is_meta for p in pipe.transformer.parameters())
        return export_bundle(pipe, out, family, dtype, progress=False)


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_a_streamed_bundle_matches_diffusers_on_the_same_folder(
    preset, folder, tmp_path, monkeypatch
):
    cuts = []
    split = streamed_export.split
    monkeypatch.setattr(streamed_export, "SEGMENT_BYTES", SEGMENT)
    monkeypatch.setattr(streamed_export, "split", lambda *a: cuts.append(split(*a)) or cuts[-1])
    manifest = _bundle(folder(preset), tmp_path / "bundle")
    assert len(cuts[3 if preset == "tiny-sd3" else 2]) > 5  # the transformer, in pieces
    graph = onnx.load(str(tmp_path / "bundle" / "transformer.onnx"), load_external_data=False)
    graph = graph.graph
    weights = {t.name for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights]
    assert all(e["parity"]["max_rel"] < 1e-5 for e in manifest["components"].values())

    eager_pipe = DiffusionPipeline.from_pretrained(
        folder(preset), use_safetensors=True, torch_dtype=torch.float32
    )
    runtime = Pipeline.load(tmp_path / "bundle", device="cpu")
    latents = noise((2, 16, 8, 12), 2)
    call = {"num_inference_steps": 3, "guidance_scale": 3.5, "height": 64, "width": 96}
    ours = runtime(PROMPTS, latents=latents, output_type="np", **call)
    given = packed(runtime, latents) if preset == "tiny-flux" else latents
    want = eager(eager_pipe, given, prompt=PROMPTS, **call)
    assert np.abs(ours.images - want).max() <= IMAGE_TOLERANCE


def test_the_streamed_fp16_policy_still_finds_t5s_overflow(tmp_path, monkeypatch):
    """tiny-sd3's T5 with its last `wo` scaled past fp16's range (as test_fp16_dit), saved as
    a folder and exported lazily in segments: the measurement keeps that MatMul fp32."""
    monkeypatch.setattr(streamed_export, "SEGMENT_BYTES", SEGMENT)
    pipe = load.random_pipeline("tiny-sd3")
    with torch.no_grad():
        pipe.text_encoder_3.encoder.block[-1].layer[-1].DenseReluDense.wo.weight *= 3e4
    pipe.save_pretrained(tmp_path / "src")
    lazy = load.lazy_pipeline(tmp_path / "src")
    (t5,) = [c for c in text_encoder_components(lazy, 16) if c.name == "text_encoder_3"]
    dims = trace_dims(4, vocab_size(lazy), 8)
    t5.calibration = calibration_feeds(lazy, t5, dims, (4, 4))
    check = {**dims, "batch": 2}
    path = tmp_path / "t5.onnx"
    out = streamed_export.export_streamed(
        t5, t5.sample_inputs(dims), t5.sample_inputs(check, 1), path, "fp16",
        lambda name: __import__("contextlib").nullcontext(), weightless_trace(t5),
    )  # fmt: skip
    parity = compare(out, reference_outputs(t5, check))
    assert parity["finite"] and parity["max_rel"] <= TOLERANCE["fp16"]  # measured 1.2e-3
    graph = onnx.load(str(path), load_external_data=False).graph
    types = {t.name: t.data_type for t in graph.initializer}
    (wo,) = [n for n in graph.node if n.name.endswith("block.1/layer.1/DenseReluDense/wo/MatMul")]
    assert types[next(i for i in wo.input if i in types)] == onnx.TensorProto.FLOAT
    assert onnx.TensorProto.FLOAT16 in types.values()


def test_pytorch_holds_one_layers_weights_at_a_time(folder):
    pipe = load.lazy_pipeline(folder("tiny-flux"))
    (transformer,) = [
        c for c in load.export_family("flux").components(pipe) if c.name == "transformer"
    ]
    real = []

    def count(module, args):
        real.append(sum(p.numel() for p in transformer.module.parameters() if not p.is_meta))

    with weights_while_called(transformer.module):  # its hooks first: count after the load
        hooks = [m.register_forward_pre_hook(count) for m in transformer.module.modules()]
        reference_outputs(transformer, load.export_family("flux").add_dims(trace_dims(4, 99, 8)))
    for hook in hooks:
        hook.remove()
    largest = max(
        sum(p.numel() for p in m._parameters.values() if p is not None)
        for m in transformer.module.modules()
    )
    assert max(real) <= 2 * largest and max(real) > 0
    assert all(p.is_meta for p in transformer.module.parameters())  # all dropped again


def test_a_big_preset_is_written_as_a_folder_and_streamed(monkeypatch, tmp_path):
    monkeypatch.setattr(load, "LAZY_BYTES", 1000)
    with load.opened_pipeline(None, "tiny-flux", progress=False) as pipe:
        assert is_lazy(pipe.transformer)
        source, _ = pipe.transformer.x_embedder.weight.sdrt_source
        root = next(iter(source.files.values())).parent.parent
        assert len(list(root.glob("*/*.safetensors"))) == 4
        export_bundle(pipe, tmp_path / "b", "flux", progress=False, release_weights=True)
        # each model's shards went once exported: never the whole checkpoint beside the bundle
        assert (root / "model_index.json").is_file() and not list(root.glob("*/*.safetensors"))
    assert not root.exists()  # the temporary folder goes with the export


def test_a_users_folder_keeps_its_weights(folder, tmp_path):
    with load.opened_pipeline(str(folder("tiny-flux")), lazy=True) as pipe:
        export_bundle(pipe, tmp_path / "b", "flux", progress=False, release_weights=True)
    assert len(list(folder("tiny-flux").glob("*/*.safetensors"))) == 4
    with load.opened_pipeline(None, "tiny", progress=False) as pipe:  # U-Nets load whole
        assert not is_lazy(pipe.unet)


def test_a_checkpoint_that_does_not_fit_its_config_is_one_line(folder, tmp_path):
    src = folder("tiny-flux")
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(src, copy)
    config = json.loads((copy / "transformer" / "config.json").read_text())
    config["joint_attention_dim"] += 8
    (copy / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="context_embedder.weight.*configuration makes it"):
        load.lazy_pipeline(copy)


def test_weights_are_read_as_safetensors_reads_them(tmp_path):
    from safetensors.torch import save_file

    from sdrt.export.lazy_weights import WeightSource

    tensors = {
        f"w_{dtype}": (torch.randn(3, 5) * 100).to(dtype)
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    source = WeightSource.of_folder(tmp_path)
    for key, tensor in tensors.items():
        assert torch.equal(source.read(key), tensor.float())
    save_file({"ids": torch.arange(4)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(UserError, match="'ids' is I64; sdrt reads F32, F16 and BF16"):
        WeightSource.of_folder(tmp_path).read("ids")


def test_a_streamed_bf16_bundle_is_checked_as_its_fp32_emulation(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(streamed_export, "SEGMENT_BYTES", SEGMENT)
    manifest = _bundle(folder("tiny-flux"), tmp_path / "bundle", "bf16")
    for entry in manifest["components"].values():
        assert entry["precision"] == "bf16"
        assert entry["parity"]["max_rel"] <= TOLERANCE["bf16"]  # measured 4.8e-3 to 2.7e-2
    graph = onnx.load(str(tmp_path / "bundle" / "transformer.onnx"), load_external_data=False)
    types = {t.data_type for t in graph.graph.initializer}
    assert onnx.TensorProto.BFLOAT16 in types


def test_run_time_lora_is_refused_for_a_streamed_export(folder, tmp_path):
    refused = pytest.raises(UserError, match="--lora-rank is not supported yet.*weights on disk")
    with load.opened_pipeline(str(folder("tiny-flux")), lazy=True) as pipe, refused:
        export_bundle(pipe, tmp_path / "b", "flux", progress=False, lora_rank=4)
    assert not (tmp_path / "b").exists()
