"""A bundle is validated on load: each problem is one clear UserError naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from sdrt import Pipeline
from sdrt.bundle import Bundle
from sdrt.errors import UserError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_missing_onnx_file_is_named(bundle_copy):
    (bundle_copy / "unet.onnx").unlink()
    with pytest.raises(UserError, match="unet.onnx is missing"):
        Pipeline.load(bundle_copy)


def test_onnx_file_whose_hash_does_not_match_is_refused(bundle_copy):
    with (bundle_copy / "vae_decoder.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="vae_decoder.onnx does not match the sha256"):
        Pipeline.load(bundle_copy)


def test_missing_manifest(bundle_copy):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json is missing"):
        Bundle.load(bundle_copy)


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Bundle.load(bundle_copy)


def test_manifest_of_another_schema_version(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="schema version 99"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize(
    ("key", "value", "graph", "stated"),
    [
        ("vae_scale_factor", 4, "vae_decoder.onnx", "8 (its 3 2x upsamplings)"),
        ("latent_channels", 8, "unet.onnx", "4 (its output's channels)"),
        ("unet_in_channels", 9, "unet.onnx", "4 (its input sample's channels)"),
    ],
)
def test_a_manifest_number_its_graphs_contradict_is_refused(bundle_copy, key, value, graph, stated):
    """Edited to 4, vae_scale_factor made a 64x64 request decode to 128x128; a wrong
    latent_channels failed inside ONNX Runtime."""
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest[key] = value
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as refused:
        Pipeline.load(bundle_copy, device="cpu")
    assert str(refused.value) == (
        f"manifest.json says {key} {value}, but {graph} has {stated}; the manifest was edited "
        "or belongs to another export (re-export the bundle)"
    )


def test_missing_bundle_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Bundle.load(tmp_path / "nowhere")


@pytest.mark.parametrize("graph_cache", [False, True], ids=["optimized at load", "cached"])
def test_a_changed_weight_is_refused_though_the_engines_load_it(bundle_copy, graph_cache):
    """One flipped weight byte: the graph parses and ORT loads it while the hashes are checked
    beside it, and the load still fails on the hash before it returns."""
    data = bytearray((bundle_copy / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_copy / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="unet.onnx does not match the sha256"):
        Pipeline.load(bundle_copy, device="cpu", graph_cache=graph_cache)
