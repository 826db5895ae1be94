"""A checkpoint file that is not what its name says is one line and exit code 2, found from its
first bytes before export sizes anything (the memory estimate included) from its numbers."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from sdrt.cli import main


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def tensor(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"w": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}}


WHOLE = safetensors_bytes(tensor("F32", [2], 0, 8), bytes(8))
NOT_SAFETENSORS = {
    # the first 8 random bytes read as a header length of about 10^19
    "random bytes": (
        np.random.default_rng(0).bytes(4096),
        "its header length 11749869230777074271 runs past the end of the 4096-byte file",
    ),
    "truncated header": (WHOLE[:30], "its header length 61 runs past the end of the 30-byte file"),
    "header length past the end": (
        struct.pack("<Q", 2**62) + b"{}",
        f"its header length {2**62} runs past the end of the 10-byte file",
    ),
    "tensor past the end": (
        safetensors_bytes(tensor("F32", [10**9], 0, 4 * 10**9)),
        "tensor 'w' spans bytes 0-4000000000, outside the file's 0 bytes of data",
    ),
    "shape larger than its bytes": (
        safetensors_bytes(tensor("F16", [10**15], 0, 2), b"ab"),
        "tensor 'w' of shape [1000000000000000] holds 2 bytes, not 2000000000000000",
    ),
    "header not JSON": (
        struct.pack("<Q", 4) + b"\xff{[}",
        "its header is not JSON: 'utf-8' codec can't decode byte 0xff in position 0: invalid "
        "start byte",
    ),
}


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("content, reason", NOT_SAFETENSORS.values(), ids=NOT_SAFETENSORS)
def test_a_safetensors_file_that_is_not_one_is_named_before_the_estimate(
    tmp_path, capsys, content, reason
):
    source = tmp_path / "model.safetensors"
    source.write_bytes(content)
    assert main(["export", str(source), str(tmp_path / "bundle")]) == 2
    assert error_line(capsys) == (
        f"sdrt: error: {source} is not a safetensors file ({reason}); download or convert it again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_damaged_component_of_a_folder_is_named_by_the_estimate(tiny_model_dir, tmp_path):
    from sdrt.errors import UserError
    from sdrt.export import memory_estimate as mem

    folder = tmp_path / "model"
    folder.mkdir()
    for part in tiny_model_dir.iterdir():  # links: only the U-Net's weights are replaced
        (folder / part.name).symlink_to(part, target_is_directory=part.is_dir())
    (folder / "unet").unlink()
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(struct.pack("<Q", 2**62))
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors is not a safetensors"):
        mem.source_component_bytes(str(folder), None)


def test_a_pickle_checkpoint_is_refused_or_checked_before_the_estimate(tmp_path, capsys):
    source = tmp_path / "model.ckpt"
    source.write_bytes(np.random.default_rng(1).bytes(1000))
    assert main(["export", str(source), str(tmp_path / "a")]) == 2
    assert error_line(capsys) == (
        "sdrt: error: model.ckpt is a pickle checkpoint, which can run arbitrary code when "
        "loaded; convert it to .safetensors or pass --allow-pickle"
    )
    assert main(["export", str(source), str(tmp_path / "b"), "--allow-pickle"]) == 2
    assert error_line(capsys) == (
        f"sdrt: error: {source} is not a PyTorch pickle checkpoint (neither a torch.save zip "
        "archive nor a pickle stream); download or convert it again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


@pytest.mark.parametrize("zipped", [True, False], ids=["torch.save zip", "legacy pickle"])
def test_an_allowed_pickle_checkpoint_is_estimated_by_its_size_unread(tmp_path, zipped):
    import torch

    from sdrt.export import memory_estimate as mem
    from sdrt.export.load import checked_source

    source = tmp_path / "model.ckpt"
    weights = {"state_dict": {"w": torch.zeros(256)}}
    torch.save(weights, source, _use_new_zipfile_serialization=zipped)
    assert checked_source(str(source), allow_pickle=True) == source
    assert mem.source_component_bytes(str(source), None) == {"model": source.stat().st_size}
