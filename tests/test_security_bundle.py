"""A bundle is not trusted: paths stay inside it, every file the runtime reads is hashed, the
manifest follows one schema, graphs match their role, and a signature binds it to a key."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt import Pipeline
from sdrt.bundle import Bundle, file_sha256
from sdrt.cli import main
from sdrt.errors import UserError


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def edit_manifest(root: Path, change) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def refused(root: Path, match: str, **load: Any) -> None:
    with pytest.raises(UserError, match=match):
        Bundle.load(root, **load)


# ---- containment -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd"])
def test_manifest_file_outside_the_bundle_is_refused(bundle, name):
    (bundle.parent / "outside.onnx").write_bytes((bundle / "unet.onnx").read_bytes())

    def point_out(m):
        m["components"]["unet"]["file"] = name
        m["components"]["unet"]["sha256"] = file_sha256(bundle.parent / "outside.onnx")

    edit_manifest(bundle, point_out)
    refused(bundle, "unet file .* points outside the bundle")
    refused(bundle, "points outside the bundle", verify_hashes=False)


def test_manifest_external_data_outside_the_bundle_is_refused(bundle):
    edit_manifest(bundle, lambda m: m["components"]["unet"].update(external_data="../w.data"))
    refused(bundle, "external data '../w.data' .* points outside the bundle")


def test_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle / "vae_decoder.onnx", outside)
    os.symlink(outside, bundle / "vae_decoder.onnx")  # same bytes, same hash: only the path
    refused(bundle, "vae_decoder file 'vae_decoder.onnx' .* points outside the bundle")


def test_symlinked_tokenizer_folder_out_of_the_bundle_is_refused(bundle, tmp_path):
    shutil.move(bundle / "tokenizer", tmp_path / "tok")
    os.symlink(tmp_path / "tok", bundle / "tokenizer")
    refused(bundle, "tokenizer folder 'tokenizer' .* points outside the bundle")


def test_info_does_not_stat_a_path_outside_the_bundle(bundle, capsys):
    edit_manifest(bundle, lambda m: m["components"]["unet"].update(file="/etc/passwd"))
    assert main(["info", str(bundle), "--no-verify"]) == 2
    assert "points outside the bundle" in capsys.readouterr().err


def _graph_with_external(location: str) -> bytes:
    """A U-Net-shaped graph whose one weight lives in an external file at `location`."""
    weight = numpy_helper.from_array(np.ones(4, np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    io = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
        for n in ("sample", "timestep", "encoder_hidden_states")
    ]
    out = [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph([], "g", io, out, [weight])).SerializeToString()


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../../../etc/passwd", "external data named inside unet.onnx .* points outside"),
        ("/etc/passwd", "external data named inside unet.onnx .* points outside"),
        ("stray.bin", "reads external data 'stray.bin' that manifest.json does not list"),
    ],
)
def test_graph_naming_unlisted_or_outside_external_data_is_refused(bundle, location, message):
    (bundle / "stray.bin").write_bytes(b"\0" * 16)
    (bundle / "unet.onnx").write_bytes(_graph_with_external(location))
    edit_manifest(
        bundle, lambda m: m["components"]["unet"].update(sha256=file_sha256(bundle / "unet.onnx"))
    )
    refused(bundle, message)
    refused(bundle, message, verify_hashes=False)


# ---- everything read is hashed -------------------------------------------------------------


def test_changed_tokenizer_file_is_refused(bundle):
    with (bundle / "tokenizer" / "tokenizer.json").open("a") as f:
        f.write(" ")
    refused(bundle, r"tokenizer/tokenizer.json does not match the sha256")


def test_added_tokenizer_file_is_refused(bundle):
    (bundle / "tokenizer" / "vocab.json").write_text("{}")  # would change what is read
    refused(bundle, r"tokenizer differs from manifest.json; unlisted: vocab.json")


# ---- one manifest schema -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (lambda m: m.update(schema_version=True), "schema_version must be an integer, got True"),
        (lambda m: m.update(components=[]), "components must be an object of components"),
        (lambda m: m.update(default_size="512"), r"default_size must be \[height, width\]"),
        (lambda m: m.update(vae_scaling_factor=0), "vae_scaling_factor must be a finite positive"),
        (lambda m: m.update(size_multiple=0), r"size_multiple must be in \[1, 1024\], got 0"),
        (lambda m: m.update(scheduler="warp"), "scheduler must be one of"),
        (lambda m: m.pop("family"), "family is missing"),
        (
            lambda m: m["components"]["unet"].update(sha256=5),
            "components.unet.sha256 must be 64 lowercase hex digits",
        ),
        (
            lambda m: m["components"]["unet"]["inputs"].pop(0),
            "components.unet.inputs lacks sample, which this component's role needs",
        ),
    ],
)
def test_manifest_breaking_the_schema_is_refused_with_one_line_per_problem(bundle, change, line):
    edit_manifest(bundle, change)
    with pytest.raises(UserError) as err:
        Bundle.load(bundle)
    assert any(re.search(line, row) for row in _lines(err)), str(err.value)


def test_every_schema_problem_gets_its_own_line(bundle):
    edit_manifest(bundle, lambda m: m.update(latent_channels="4", text_max_length=-1))
    with pytest.raises(UserError) as err:
        Bundle.load(bundle)
    rows = _lines(err)
    assert "latent_channels must be an integer, got '4'" in rows
    assert any(row.startswith("text_max_length must be in [1, 4096]") for row in rows)


def _lines(err: pytest.ExceptionInfo) -> list[str]:
    return [row.strip() for row in str(err.value).splitlines()[1:]]


def test_graph_whose_inputs_do_not_fit_its_role_is_refused_at_load(bundle):
    shutil.copy(bundle / "vae_decoder.onnx", bundle / "unet.onnx")  # a VAE posing as a U-Net
    edit_manifest(
        bundle, lambda m: m["components"]["unet"].update(sha256=file_sha256(bundle / "unet.onnx"))
    )
    refused(bundle, r"unet.onnx has inputs \['latent'\], but a unet takes")


def test_info_verifies_hashes_unless_told_not_to(bundle, capsys):
    _double_first_weight(bundle / "unet.onnx")
    assert main(["info", str(bundle)]) == 2
    assert "unet.onnx does not match the sha256" in capsys.readouterr().err
    assert main(["info", str(bundle), "--no-verify"]) == 0


def _double_first_weight(path: Path) -> None:
    """A still well-formed graph whose weights differ."""
    import onnx

    model = onnx.load_model(path)
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
    onnx.save_model(model, path)


# ---- signatures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("keys")
    paths = {}
    for name in ("ours", "theirs"):
        key = ec.generate_private_key(ec.SECP256R1())
        paths[f"{name}_private"] = folder / f"{name}.pem"
        paths[f"{name}_private"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        paths[f"{name}_public"] = folder / f"{name}.pub.pem"
        paths[f"{name}_public"].write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return paths


@pytest.fixture
def signed(bundle, keys) -> Path:
    assert main(["sign", str(bundle), "--key", str(keys["ours_private"])]) == 0
    return bundle


def test_signed_bundle_loads_with_its_public_key(signed, keys, capsys):
    pipe = Pipeline.load(signed, device="cpu", trusted_key=keys["ours_public"])
    assert pipe.manifest["family"] == "sd1"
    assert main(["verify", str(signed), "--key", str(keys["ours_public"])]) == 0
    (signed / "engines").mkdir()  # built later on the serving machine: outside the signature
    (signed / "engines" / "x.engine").write_bytes(b"x")
    Bundle.load(signed, trusted_key=keys["ours_public"])


def _retouch_manifest(root: Path) -> None:
    edit_manifest(root, lambda m: m.update(scheduler="ddim"))


def _retouch_weight(root: Path) -> None:
    """Change a graph and its manifest hash together: integrity passes, authenticity must not."""
    _double_first_weight(root / "vae_decoder.onnx")
    edit_manifest(
        root,
        lambda m: m["components"]["vae_decoder"].update(
            sha256=file_sha256(root / "vae_decoder.onnx")
        ),
    )


def _retouch_tokenizer(root: Path) -> None:
    vocab = root / "tokenizer" / "tokenizer.json"
    vocab.write_text(vocab.read_text() + " ")
    edit_manifest(
        root,
        lambda m: m["tokenizer_files"]["tokenizer"].update({"tokenizer.json": file_sha256(vocab)}),
    )


@pytest.mark.parametrize(
    ("tamper", "changed"),
    [
        (_retouch_weight, "vae_decoder.onnx"),
        (_retouch_manifest, "manifest.json"),
        (_retouch_tokenizer, "tokenizer/tokenizer.json"),
    ],
)
def test_tampering_after_signing_is_refused(signed, keys, tamper, changed, capsys):
    tamper(signed)
    Bundle.load(signed)  # the hashes alone no longer notice
    with pytest.raises(UserError, match=f"changed since signing: .*{changed}"):
        Pipeline.load(signed, device="cpu", trusted_key=keys["ours_public"])
    assert main(["verify", str(signed), "--key", str(keys["ours_public"])]) == 2
    assert "fails signature verification" in capsys.readouterr().err


def test_added_file_after_signing_is_refused(signed, keys):
    (signed / "extra.onnx.data").write_bytes(b"\0")
    with pytest.raises(UserError, match="fails signature verification.*extra.onnx.data"):
        Bundle.load(signed, trusted_key=keys["ours_public"])


def test_another_key_is_refused(signed, keys):
    with pytest.raises(UserError, match="fails signature verification.*Key mismatch"):
        Bundle.load(signed, trusted_key=keys["theirs_public"])


def test_unsigned_bundle_is_refused_when_a_key_is_trusted(bundle, keys, capsys):
    with pytest.raises(UserError, match="is not signed"):
        Pipeline.load(bundle, device="cpu", trusted_key=keys["ours_public"])
    args = ["generate", str(bundle), "--prompt", "x", "--trusted-key", str(keys["ours_public"])]
    assert main(args) == 2
    assert "is not signed (sdrt.sig is missing)" in capsys.readouterr().err


def test_signing_without_model_signing_installed_names_the_extra(bundle, keys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_model_signing(name, *args, **kwargs):
        if name == "model_signing":
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_model_signing)
    with pytest.raises(UserError, match=r"pip install 'sdrt\[sign\]'"):
        Bundle.load(bundle, trusted_key=keys["ours_public"])


def test_serve_refuses_a_bundle_not_signed_by_the_trusted_key(signed, bundle, keys):
    """`sdrt serve --trusted-key` as a real process: it exits 2 with the reason before binding."""
    command = [sys.executable, "-m", "sdrt.cli", "serve", str(bundle), "--port", "0"]
    done = subprocess.run(
        [*command, "--trusted-key", str(keys["theirs_public"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "fails signature verification" in done.stderr
