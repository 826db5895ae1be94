"""Export's stage watch and the export memory benchmark: which stage ran, and what it held.

The memory goals themselves are benchmark figures (benchmarks/RESULTS.md), not tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from sdrt import UserError
from sdrt.export.stages import StageWatch, peak_bytes, rss_bytes

MIB = 2**20


def test_rss_and_peak_are_read_from_the_process():
    now, peak = rss_bytes(), peak_bytes()
    assert 0 < now <= peak


def test_a_stage_that_allocates_records_the_process_high_water_mark():
    watch = StageWatch()
    before = peak_bytes()
    size = before + 64 * MIB  # past the high-water mark, so this stage sets a new one
    with watch.stage("unet", "trace"):
        block = np.ones(size // 8, dtype=np.float64)  # touched, so resident
        del block
    with watch.stage("unet", "write"):
        pass
    trace, write = watch.records
    assert (trace.component, trace.stage, trace.exact) == ("unet", "trace", True)
    assert trace.peak_bytes >= size
    # the next stage allocated nothing: its peak is what was resident, far below
    assert not write.exact and write.peak_bytes < trace.peak_bytes - 32 * MIB
    assert watch.component_peaks() == {"unet": trace.peak_bytes}


def test_the_watch_reports_each_stage_start_with_the_rss():
    seen = []
    watch = StageWatch(on_change=lambda *args: seen.append(args))
    with watch.for_component("vae_decoder")("verify"):
        pass
    component, stage, rss = seen[0]
    assert (component, stage) == ("vae_decoder", "verify") and rss > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "tiny.json"
    command = [sys.executable, "-m", "sdrt.benchmarks.export_memory", "tiny"]
    done = subprocess.run(
        [*command, "--json", str(out), "--progress"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done


def test_benchmark_reports_every_stage_of_every_component(tiny_run):
    result, done = tiny_run
    stages = {(r["component"], r["stage"]) for r in result["stages"]}
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert {(component, s) for s in ("reference", "trace", "write", "verify")} <= stages
    assert ("pipeline", "load") in stages
    peaks = result["component_peaks"]
    for component, peak in peaks.items():
        own = [r["peak_bytes"] for r in result["stages"] if r["component"] == component]
        assert peak == max(own)
    assert result["peak_rss_bytes"] >= max(peaks.values()) > result["start_rss_bytes"] > 0
    assert "| unet | verify |" in done.stdout and "process peak RSS" in done.stdout
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert result["parity"][component]["max_rel"] <= 1e-3  # fp32: export's tolerance
        assert f"| {component} | fp32 |" in done.stdout


def test_progress_bar_shows_the_stage_and_rss(tiny_run):
    _, done = tiny_run
    assert "unet: trace, RSS" in done.stderr and "vae_encoder: verify, RSS" in done.stderr


def test_weights_streamed_into_one_file_give_the_same_outputs(tmp_path):
    """The exporter's per-weight files (as torch writes a model over 2 GB) gathered into one
    page-aligned file: ONNX Runtime computes exactly what the original graph computes."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from sdrt.export.external_data import ALIGN, external_tensors, gather_external_data

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in (1, 2)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("h2", onnx.TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    traced = tmp_path / "traced"
    traced.mkdir()
    onnx.save_model(
        model,
        traced / "m.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    skeleton = onnx.load(str(traced / "m.onnx"), load_external_data=False)
    assert len({t.external_data[0].value for t in external_tensors(skeleton)}) == 3

    out = tmp_path / "bundle"
    out.mkdir()
    gather_external_data(skeleton, traced, out / "m.onnx.data")
    onnx.save_model(skeleton, str(out / "m.onnx"))
    offsets = [
        int(e.value)
        for t in external_tensors(skeleton)
        for e in t.external_data
        if e.key == "offset"
    ]
    assert len(offsets) == 3 and all(o % ALIGN == 0 for o in offsets)

    x = rng.standard_normal((2, 8)).astype(np.float32)
    want = x @ weights[0] @ weights[1] @ weights[2]
    (got,) = ort.InferenceSession(str(out / "m.onnx")).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_export_refuses_in_one_line_when_the_estimate_exceeds_max_memory(tmp_path, capsys):
    from sdrt.cli import main

    out = tmp_path / "bundle"
    assert main(["export", "--random-weights", "tiny", str(out), "--max-memory", "0.05"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--max-memory" in err and "GiB" in err
    assert not out.exists()


def test_estimate_reads_the_same_weights_from_a_folder_as_from_the_loaded_pipeline(
    tiny_model_dir, tiny_pipe
):
    from sdrt.export import memory_estimate as mem

    loaded = mem.pipeline_component_bytes(tiny_pipe)
    on_disk = mem.folder_component_bytes(tiny_model_dir)
    assert on_disk == loaded and loaded["unet"] > 0
    assert mem.estimate_peak_bytes(loaded) == mem.estimate_peak_bytes(on_disk)


def test_estimate_follows_the_export_order_and_the_exporters_two_ways_of_writing():
    """SD 1.5's sizes: the text encoder's trace (under 2 GB, serialised in memory) with the
    whole pipeline loaded is the peak; SDXL's text encoders are freed before its U-Net, whose
    graph passes (fp16, fusions) then hold one copy of it and their working memory (counted
    whole for every component, which overestimates the small ones)."""
    from sdrt.export import memory_estimate as mem

    gib = mem.GIB
    sd15 = {"text_encoder": int(0.46 * gib), "unet": int(3.2 * gib), "vae": int(0.31 * gib)}
    total = sum(sd15.values())
    assert mem.estimate_peak_bytes(sd15) == mem.BASE_BYTES + int(
        total + mem.INLINE_FACTOR * sd15["text_encoder"]
    )
    sdxl = {"text_encoder": int(0.46 * gib), "text_encoder_2": int(2.59 * gib),
            "unet": int(9.6 * gib), "vae": int(0.31 * gib)}  # fmt: skip
    held = sum(sdxl.values())
    trace = max(
        held + mem.INLINE_FACTOR * sdxl["text_encoder"],
        held - sdxl["text_encoder"] + mem.EXTERNAL_FACTOR * sdxl["text_encoder_2"],
        sdxl["unet"] + sdxl["vae"] + mem.EXTERNAL_FACTOR * sdxl["unet"],
    )
    assert mem.estimate_peak_bytes(sdxl) == mem.BASE_BYTES + int(trace)
    passes = held + mem.PASS_EXTRA_BYTES  # the first encoder's passes, all else loaded
    assert mem.estimate_peak_bytes(sdxl, passes=True) == mem.BASE_BYTES + int(passes)
    assert mem.estimate_peak_bytes({"model": 4 * gib}) > 4 * gib  # one checkpoint file


def test_released_export_frees_each_component_after_verifying_against_it(tmp_path):
    """With release_weights, PyTorch runs before each weight is freed: verification still
    compares against the full model (same parity as a normal export), and nothing is left."""
    from sdrt.export.bundle_writer import export_bundle
    from sdrt.export.load import random_pipeline

    pipe = random_pipeline("tiny", seed=0)
    manifest = export_bundle(pipe, tmp_path / "b", "sd1", progress=False, release_weights=True)
    for entry in manifest["components"].values():
        assert entry["parity"]["max_rel"] <= 1e-3
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        assert sum(p.numel() for p in module.parameters()) == 0


def test_graphs_a_pass_rewrote_keep_large_weights_in_a_data_file(tiny_pipe, tmp_path, monkeypatch):
    """Writing a rewritten graph inline builds the whole file in memory; above INLINE_WRITE
    its weights are streamed into a page-aligned .data file, and the bundle still matches."""
    import onnx

    from sdrt.export import onnx_export
    from sdrt.export.bundle_writer import export_bundle
    from sdrt.export.external_data import ALIGN, external_tensors

    monkeypatch.setattr(onnx_export, "INLINE_WRITE", 0)
    manifest = export_bundle(tiny_pipe, tmp_path / "b", "sd1", dtype="fp16", progress=False)
    for name, entry in manifest["components"].items():
        assert entry["external_data"] == f"{name}.onnx.data"
        assert entry["parity"]["max_rel"] <= 3e-2
        graph = onnx.load(str(tmp_path / "b" / entry["file"]), load_external_data=False)
        offsets = [int(e.value) for t in external_tensors(graph) for e in t.external_data
                   if e.key == "offset"]  # fmt: skip
        assert offsets and all(o % ALIGN == 0 for o in offsets)


def test_the_default_never_refuses_and_warns_in_one_line_above_what_is_available_now(
    monkeypatch, capsys, tmp_path
):
    """Machines that grow their memory as it is used (microVMs) report little at first."""
    from sdrt.cli import main
    from sdrt.export import load
    from sdrt.export import memory_estimate as mem

    estimate = mem.estimate_peak_bytes(mem.source_component_bytes(None, "tiny"))
    monkeypatch.setattr(mem, "available_bytes", lambda: estimate // 2)

    def loaded(*args, **kwargs):  # past the check: the export would start here
        raise UserError("loading")

    monkeypatch.setattr(load, "load_pipeline", loaded)
    with pytest.warns(RuntimeWarning) as caught:
        assert main(["export", "--random-weights", "tiny", str(tmp_path / "bundle")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "sdrt: error: loading"
    [shown] = caught
    warning = warnings.formatwarning(shown.message, shown.category, shown.filename, shown.lineno)
    assert warning.count("\n") == 1 and warning.endswith("\n")  # as the CLI shows it
    assert warning.startswith("sdrt: warning: this export needs about ")
    assert f"{estimate / 2**31:.1f} GiB is available now; going on" in warning
    with pytest.warns(RuntimeWarning):  # the default warns where the estimate is above
        mem.check_export_memory(None, None, "tiny", False, available=1)
    mem.check_export_memory(0, None, "tiny", False, available=1)  # 0: no check at all
    with pytest.raises(UserError, match="allowed by --max-memory"):
        mem.check_export_memory(0.001, None, "tiny", False)


def test_a_streamed_export_is_estimated_by_its_segments_not_its_size():
    """A full-size transformer streams (export/streamed_export.py): its estimate is the
    measured streamed peak, not its 33-67 GB of fp32 weights; a U-Net preset is unchanged."""
    from sdrt.export import memory_estimate as mem

    with pytest.raises(UserError, match=r"about 8\.\d GiB"):  # measured 6.24-8.51 GiB
        mem.check_export_memory(1.0, None, "flux-schnell", passes=True)
    mem.check_export_memory(mem.STREAMED_BYTES / mem.GIB + 1, None, "sd35-large", passes=True)
    with pytest.raises(UserError, match=r"about 1[0-9]\.\d GiB"):  # SDXL: its whole pipeline
        mem.check_export_memory(1.0, None, "sdxl", passes=True)
