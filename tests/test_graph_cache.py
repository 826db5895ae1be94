"""The graph cache: a cached optimized graph gives the uncached images bit for bit, is keyed so
that it is never used for another provider, machine or ORT, and a corrupted, half-written or
unwritable cache costs the speed-up, never the load or the result."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from sdrt import Pipeline, graph_cache
from sdrt.errors import UserError

CALL = {"num_inference_steps": 2, "guidance_scale": 7.5, "height": 64, "width": 64}
LATENTS = np.random.default_rng(5).standard_normal((1, 4, 8, 8), np.float32)


def image(pipe: Pipeline) -> np.ndarray:
    return pipe("a red bicycle", latents=LATENTS, output_type="np", **CALL).images


def statuses(pipe: Pipeline) -> set[str]:
    return {s for e in pipe.engines.values() for s in e.graph_cache_status.values()}


def entries(folder) -> list:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def uncached_image(tiny_bundle):
    return image(Pipeline.load(tiny_bundle, device="cpu", graph_cache=False))


def test_cached_graphs_give_the_uncached_images_bit_for_bit(tiny_bundle, tmp_path, uncached_image):
    stored = Pipeline.load(tiny_bundle, device="cpu", graph_cache=tmp_path)
    assert statuses(stored) == {"stored"}
    assert len(entries(tmp_path)) == len(stored.engines)  # one entry per graph
    hit = Pipeline.load(tiny_bundle, device="cpu", graph_cache=tmp_path)
    assert statuses(hit) == {"hit"}
    np.testing.assert_array_equal(image(stored), uncached_image)
    np.testing.assert_array_equal(image(hit), uncached_image)


def flip_exponent_bit_midway(path) -> None:
    """Same size, other bytes: the record's sizes still match."""
    data = bytearray(path.read_bytes())
    data[len(data) // 8 * 4 + 3] ^= 0x40  # the top byte of a float32 in the middle
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damaged",
    [graph_cache.WEIGHTS, graph_cache.MODEL],
    ids=["weights ONNX Runtime still loads", "graph ONNX Runtime refuses"],
)
def test_an_entry_whose_files_changed_is_rebuilt_not_used(
    tiny_bundle, tmp_path, uncached_image, damaged
):
    """Damaged weights still load (a float changed is a valid float): only the CRC-32 keeps
    them from being used."""
    Pipeline.load(tiny_bundle, device="cpu", graph_cache=tmp_path)
    for entry in entries(tmp_path):
        if damaged == graph_cache.MODEL:
            model = entry / graph_cache.MODEL
            data = bytearray(model.read_bytes())
            data[-20] ^= 0xFF
            model.write_bytes(bytes(data))
        else:
            flip_exponent_bit_midway(entry / graph_cache.WEIGHTS)
    rebuilt = Pipeline.load(tiny_bundle, device="cpu", graph_cache=tmp_path)
    assert statuses(rebuilt) == {"rebuilt"}
    np.testing.assert_array_equal(image(rebuilt), uncached_image)
    assert statuses(Pipeline.load(tiny_bundle, device="cpu", graph_cache=tmp_path)) == {"hit"}


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: (entry / graph_cache.RECORD).write_text("{not json"),
        lambda entry: (
            (entry / graph_cache.WEIGHTS).unlink(missing_ok=True)
            or (entry / graph_cache.MODEL).write_bytes(b"short")
        ),
        lambda entry: (entry / graph_cache.RECORD).write_text(
            json.dumps({**json.loads((entry / graph_cache.RECORD).read_text()), "key": {}})
        ),
    ],
    ids=["unreadable record", "truncated model", "record of another key"],
)
def test_an_entry_with_a_bad_record_is_replaced(tiny_bundle, tmp_path, damage, uncached_image):
    Pipeline.load(tiny_bundle, device="cpu", graph_cache=tmp_path)
    for entry in entries(tmp_path):
        damage(entry)
    again = Pipeline.load(tiny_bundle, device="cpu", graph_cache=tmp_path)
    assert statuses(again) == {"stored"}
    np.testing.assert_array_equal(image(again), uncached_image)


def test_an_unwritable_cache_loads_without_it(tiny_bundle, tmp_path, uncached_image):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the folder should be")
    pipe = Pipeline.load(tiny_bundle, device="cpu", graph_cache=blocked)
    assert statuses(pipe) == {"failed"}
    np.testing.assert_array_equal(image(pipe), uncached_image)


def test_an_interrupted_store_commits_nothing(tmp_path):
    key = graph_cache.GraphKey("ab" * 32, "onnxruntime-1.32.0", "CPUExecutionProvider", "x86")

    def write_then_die(target):
        target.write_bytes(b"half a model")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        graph_cache.store(tmp_path, key, write_then_die)
    assert list(tmp_path.iterdir()) == []
    assert graph_cache.lookup(tmp_path, key) is None


def test_a_tampered_bundle_file_is_refused_though_its_graph_is_cached(tiny_bundle, tmp_path):
    cache, bundle = tmp_path / "cache", tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    Pipeline.load(bundle, device="cpu", graph_cache=cache)
    data = bytearray((bundle / "vae_decoder.onnx").read_bytes())
    data[-20] ^= 0xFF  # a weight byte: the graph still parses, ORT is never asked to read it
    (bundle / "vae_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="vae_decoder.onnx does not match the sha256"):
        Pipeline.load(bundle, device="cpu", graph_cache=cache)


def test_every_part_of_the_key_separates_entries():
    key = graph_cache.GraphKey(
        "ab" * 32, "onnxruntime-1.32.0", "CPUExecutionProvider", "x86_64-1234", {"level": "all"}
    )
    changed = [
        dataclasses.replace(key, source_sha256="cd" * 32),
        dataclasses.replace(key, runtime="onnxruntime-1.33.0"),
        dataclasses.replace(key, provider="CUDAExecutionProvider"),
        dataclasses.replace(key, host="x86_64-5678"),
        dataclasses.replace(key, options={"level": "all", "prefer_nhwc": "1"}),
    ]
    names = {k.folder_name() for k in [key, *changed]}
    assert len(names) == 1 + len(changed)
    assert key.folder_name() == dataclasses.replace(key).folder_name()
    assert key.folder_name().startswith("onnxruntime-1.32.0-cpu-")


def test_the_key_of_a_cuda_session_names_the_cuda_provider_and_its_layout(tiny_bundle):
    from sdrt.backends.onnxruntime import CUDA, CudaOptions, graph_key, session_providers

    sha = "ab" * 32
    cpu = graph_key(sha, ["CPUExecutionProvider"])
    cuda = graph_key(sha, session_providers([CUDA, "CPUExecutionProvider"], CudaOptions()))
    nhwc = graph_key(
        sha, session_providers([CUDA, "CPUExecutionProvider"], CudaOptions(prefer_nhwc=True))
    )
    on_gpu_1 = graph_key(
        sha,
        session_providers([CUDA, "CPUExecutionProvider"], CudaOptions(device_id=1), True),
    )
    assert (cpu.provider, cuda.provider) == ("CPUExecutionProvider", CUDA)
    assert len({cpu.folder_name(), cuda.folder_name(), nhwc.folder_name()}) == 3
    assert on_gpu_1 == cuda  # the device index and CUDA graphs do not change the graph


def test_the_cache_folder_option(monkeypatch, tmp_path):
    monkeypatch.setenv(graph_cache.CACHE_ENV, str(tmp_path))
    assert graph_cache.cache_dir_option(True) == tmp_path
    assert graph_cache.cache_dir_option(tmp_path / "x") == tmp_path / "x"
    for off in (None, False, "off"):
        assert graph_cache.cache_dir_option(off) is None
    monkeypatch.setenv(graph_cache.CACHE_ENV, "off")
    assert graph_cache.cache_dir_option(True) is None
    monkeypatch.delenv(graph_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert graph_cache.cache_dir_option(True) == tmp_path / "sdrt" / "onnxruntime"


def test_a_graph_ort_cannot_save_loads_without_the_cache(
    tiny_bundle, tmp_path, monkeypatch, uncached_image
):
    """ONNX Runtime refuses to save some optimized graphs (compiled nodes of some providers):
    stands for onnxruntime 1.32's InferenceSession raising at creation when asked to save."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def refusing_to_save(path, options=None, **kwargs):
        if options is not None and options.optimized_model_filepath:
            raise RuntimeError("Unable to serialize model as it contains compiled nodes")
        return real(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", refusing_to_save)
    pipe = Pipeline.load(tiny_bundle, device="cpu", graph_cache=tmp_path)
    assert statuses(pipe) == {"failed"}
    assert entries(tmp_path) == []  # nothing half-written stays behind
    np.testing.assert_array_equal(image(pipe), uncached_image)


@pytest.mark.parametrize("verify", [True, False])
def test_a_changed_bundle_file_leaves_no_entry_for_the_genuine_one(
    tiny_bundle, tmp_path, uncached_image, verify
):
    """Entries are keyed by the manifest's sha256: one made from a changed file under that
    key would be used by every later load of the genuine bundle, so none is committed."""
    cache, bundle = tmp_path / "cache", tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = bytearray((bundle / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # a weight: the graph still parses and loads
    (bundle / "unet.onnx").write_bytes(bytes(data))
    if verify:
        with pytest.raises(UserError, match="unet.onnx does not match the sha256"):
            Pipeline.load(bundle, device="cpu", graph_cache=cache)
    else:  # loading a changed file unchecked is the caller's choice; caching it is not
        changed = Pipeline.load(bundle, device="cpu", graph_cache=cache, verify=False)
        assert changed.graph_cache_status["unet"] == {"unet.onnx": "failed"}
    genuine = Pipeline.load(tiny_bundle, device="cpu", graph_cache=cache)
    assert genuine.graph_cache_status["unet"] == {"unet.onnx": "stored"}
    np.testing.assert_array_equal(image(genuine), uncached_image)
