"""LoRA files are baked into the tiny model's weights at export time: W + scale * (alpha / rank)
* up @ down, for diffusers/peft and kohya naming, with one clear error for each misuse."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdrt.errors import UserError
from sdrt.export.load import random_pipeline
from sdrt.export.lora import apply_loras, parse_lora_arg

RANK = 4
UNET_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_UNET_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_UNET_LAYERS = {  # kohya name -> (in, out) of the tiny U-Net's Linear
    KOHYA_UNET_Q: (64, 64),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": (32, 64),
}
KOHYA_TE_FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
# diffusers recognises kohya text-encoder files by their attention projections, as real ones have.
KOHYA_TE_LAYERS = {
    **{f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj": (32, 32) for p in "qkv"},
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": (32, 32),
    KOHYA_TE_FC1: (32, 37),
}


@dataclass
class LoraFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    up: torch.Tensor  # of the checked U-Net layer UNET_Q
    down: torch.Tensor
    alpha_over_rank: float
    layers: dict[str, int]  # adapted layers per component, as the record should report


def tiny():
    return random_pipeline("tiny", seed=0)


def unet_q(pipe) -> torch.nn.Module:
    return pipe.unet.get_submodule(UNET_Q)


def text_fc1(pipe) -> torch.nn.Module:
    # transformers 5 dropped the `text_model.` level of CLIPTextModel; match either layout.
    return next(m for n, m in pipe.text_encoder.named_modules() if n.endswith("layers.0.mlp.fc1"))


def unet_output(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 4, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=text).sample


def file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def kohya_tensors(layers: dict[str, tuple[int, int]], alpha: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in layers.items():
        tensors[f"{name}.lora_down.weight"] = 0.1 * torch.randn(RANK, fan_in, generator=gen)
        tensors[f"{name}.lora_up.weight"] = 0.1 * torch.randn(fan_out, RANK, generator=gen)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def write_peft_lora(folder: Path) -> LoraFile:
    """Train-shaped peft adapter on every attention projection, saved the way diffusers
    training scripts save it (alpha in the safetensors metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny().unet
    config = LoraConfig(r=RANK, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(1)
    # lora_B starts at zero; random values make the adapter change something.
    tensors = {
        k: 0.1 * torch.randn(v.shape, generator=gen)
        for k, v in get_peft_model_state_dict(unet).items()
    }
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=tensors,
        weight_name="style_peft.safetensors",
        unet_lora_adapter_metadata=config.to_dict(),
    )
    layer_count = sum(k.endswith("lora_A.weight") for k in tensors)
    return LoraFile(
        path=folder / "style_peft.safetensors",
        tensors=tensors,
        up=tensors[f"{UNET_Q}.lora_B.weight"],
        down=tensors[f"{UNET_Q}.lora_A.weight"],
        alpha_over_rank=2 / RANK,
        layers={"unet": layer_count},
    )


def write_kohya_lora(folder: Path) -> LoraFile:
    tensors = kohya_tensors({**KOHYA_UNET_LAYERS, **KOHYA_TE_LAYERS}, alpha=1.0, seed=2)
    path = folder / "style_kohya.safetensors"
    save_file(tensors, path)
    return LoraFile(
        path=path,
        tensors=tensors,
        up=tensors[f"{KOHYA_UNET_Q}.lora_up.weight"],
        down=tensors[f"{KOHYA_UNET_Q}.lora_down.weight"],
        alpha_over_rank=1.0 / RANK,
        layers={"unet": len(KOHYA_UNET_LAYERS), "text_encoder": len(KOHYA_TE_LAYERS)},
    )


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, LoraFile]:
    folder = tmp_path_factory.mktemp("loras")
    return {"peft": write_peft_lora(folder), "kohya": write_kohya_lora(folder)}


@pytest.fixture(scope="module")
def base_output() -> torch.Tensor:
    """The U-Net output of the tiny model without any LoRA."""
    return unet_output(tiny())


NAMINGS = ["peft", "kohya"]


@pytest.mark.parametrize("naming", NAMINGS)
def test_fused_weight_is_base_plus_scaled_low_rank_update(lora_files, naming):
    lora = lora_files[naming]
    pipe = tiny()
    base = unet_q(pipe).weight.detach().clone()
    apply_loras(pipe, [(str(lora.path), 0.8)])
    expected = base + 0.8 * lora.alpha_over_rank * lora.up @ lora.down
    torch.testing.assert_close(unet_q(pipe).weight.detach(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("naming", NAMINGS)
def test_lora_changes_unet_output(lora_files, naming, base_output):
    pipe = tiny()
    apply_loras(pipe, [(str(lora_files[naming].path), 1.0)])
    assert (unet_output(pipe) - base_output).abs().max() > 1e-4


@pytest.mark.parametrize("naming", NAMINGS)
def test_scale_zero_leaves_unet_output_unchanged(lora_files, naming, base_output):
    pipe = tiny()
    apply_loras(pipe, [(str(lora_files[naming].path), 0.0)])
    assert torch.equal(unet_output(pipe), base_output)


@pytest.mark.parametrize("naming", NAMINGS)
def test_fused_model_has_plain_layers_only(lora_files, naming):
    """Nothing of the adapter is left to trace: same parameter names as the model without."""
    pipe = tiny()
    apply_loras(pipe, [(str(lora_files[naming].path), 1.0)])
    assert pipe.unet.state_dict().keys() == tiny().unet.state_dict().keys()
    assert pipe.text_encoder.state_dict().keys() == tiny().text_encoder.state_dict().keys()


@pytest.mark.parametrize("naming", NAMINGS)
def test_record_names_file_hash_scale_and_adapted_layers(lora_files, naming):
    lora = lora_files[naming]
    [record] = apply_loras(tiny(), [(str(lora.path), 0.5)])
    assert record == {
        "file": lora.path.name,
        "sha256": hashlib.sha256(lora.path.read_bytes()).hexdigest(),
        "scale": 0.5,
        "keys": len(file_keys(lora.path)),
        "layers": lora.layers,
    }


def test_kohya_text_encoder_keys_fuse_into_text_encoder(lora_files):
    lora = lora_files["kohya"]
    pipe = tiny()
    base = text_fc1(pipe).weight.detach().clone()
    apply_loras(pipe, [(str(lora.path), 0.7)])
    up = lora.tensors[f"{KOHYA_TE_FC1}.lora_up.weight"]
    down = lora.tensors[f"{KOHYA_TE_FC1}.lora_down.weight"]
    expected = base + 0.7 * lora.alpha_over_rank * up @ down
    torch.testing.assert_close(text_fc1(pipe).weight.detach(), expected, rtol=0, atol=1e-5)


def test_loras_apply_in_sequence_and_add_up(lora_files):
    lora = lora_files["kohya"]
    pipe = tiny()
    base = unet_q(pipe).weight.detach().clone()
    records = apply_loras(pipe, [(str(lora.path), 0.5), (str(lora.path), 0.25)])
    assert [r["scale"] for r in records] == [0.5, 0.25]
    expected = base + 0.75 * lora.alpha_over_rank * lora.up @ lora.down
    torch.testing.assert_close(unet_q(pipe).weight.detach(), expected, rtol=0, atol=1e-5)


def test_no_loras_leaves_the_pipeline_alone(base_output):
    pipe = tiny()
    assert apply_loras(pipe, []) == []
    assert torch.equal(unet_output(pipe), base_output)


# --- errors ---------------------------------------------------------------------------------


def _no_adapter_left(pipe) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = [*pipe.unet.modules(), *pipe.text_encoder.modules()]
    return not any(isinstance(m, BaseTunerLayer) for m in modules)


@pytest.mark.parametrize("name", ["style.ckpt", "style.pt", "style.bin"])
def test_non_safetensors_file_is_refused_with_a_conversion_hint(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match=rf"{name}.*convert it to \.safetensors"):
        apply_loras(tiny(), [(str(tmp_path / name), 1.0)])


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="nowhere.safetensors' does not exist"):
        apply_loras(tiny(), [(str(tmp_path / "nowhere.safetensors"), 1.0)])


def test_corrupted_file_is_refused(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match="could not read LoRA file broken.safetensors"):
        apply_loras(tiny(), [(str(path), 1.0)])


def _peft_named(prefix: str, fan: int) -> dict:
    gen = torch.Generator().manual_seed(3)
    return {
        f"{prefix}.lora_A.weight": torch.randn(RANK, fan, generator=gen),
        f"{prefix}.lora_B.weight": torch.randn(fan, RANK, generator=gen),
    }


NO_MATCH = {
    "kohya": kohya_tensors(
        {"lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q": (64, 64)}, 1.0, 3
    ),
    "peft": _peft_named("unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q", 64),
    # an SDXL LoRA's second text encoder: a component this model does not have
    "other_component": _peft_named("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", 32),
}


@pytest.mark.parametrize("case", list(NO_MATCH))
def test_file_matching_no_layer_is_refused(tmp_path, case, base_output):
    path = tmp_path / "elsewhere.safetensors"
    save_file(NO_MATCH[case], path)
    pipe = tiny()
    with pytest.raises(UserError, match="no key in LoRA file elsewhere.safetensors matches"):
        apply_loras(pipe, [(str(path), 1.0)])
    assert _no_adapter_left(pipe)
    assert torch.equal(unet_output(pipe), base_output)


def test_file_matching_only_some_layers_is_refused(tmp_path, base_output):
    path = tmp_path / "half.safetensors"
    layers = {
        KOHYA_UNET_Q: (64, 64),
        "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q": (64, 64),
    }
    save_file(kohya_tensors(layers, 1.0, 4), path)
    pipe = tiny()
    with pytest.raises(UserError, match="only 1 of the 2 layers in LoRA file half.safetensors"):
        apply_loras(pipe, [(str(path), 1.0)])
    assert _no_adapter_left(pipe)
    assert torch.equal(unet_output(pipe), base_output)


def test_file_for_a_wider_model_is_refused(tmp_path):
    path = tmp_path / "sd15_style.safetensors"
    save_file(kohya_tensors({KOHYA_UNET_Q: (320, 320)}, 1.0, 5), path)
    with pytest.raises(UserError, match="sd15_style.safetensors does not fit this model"):
        apply_loras(tiny(), [(str(path), 1.0)])


def test_nan_weights_are_refused(tmp_path):
    tensors = kohya_tensors({KOHYA_UNET_Q: (64, 64)}, 1.0, 6)
    tensors[f"{KOHYA_UNET_Q}.lora_up.weight"][0, 0] = math.nan
    path = tmp_path / "nan.safetensors"
    save_file(tensors, path)
    with pytest.raises(UserError, match="nan.safetensors at scale 1.0 gives NaN"):
        apply_loras(tiny(), [(str(path), 1.0)])


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "0.8", None, True])
def test_bad_scale_is_refused_before_any_weight_changes(lora_files, scale, base_output):
    path = str(lora_files["kohya"].path)
    pipe = tiny()
    with pytest.raises(UserError, match="is not a finite number"):
        apply_loras(pipe, [(path, 1.0), (path, scale)])
    assert torch.equal(unet_output(pipe), base_output)


# --- --lora PATH[:SCALE] ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "parsed"),
    [
        ("style.safetensors:0.8", ("style.safetensors", 0.8)),
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("loras/style.safetensors:-0.5", ("loras/style.safetensors", -0.5)),
        ("style.safetensors:0", ("style.safetensors", 0.0)),
        ("style.safetensors:1e-1", ("style.safetensors", 0.1)),
        (r"C:\loras\style.safetensors", (r"C:\loras\style.safetensors", 1.0)),
        (r"C:\loras\style.safetensors:0.3", (r"C:\loras\style.safetensors", 0.3)),
    ],
)
def test_lora_arg_is_path_and_optional_scale(arg, parsed):
    assert parse_lora_arg(arg) == parsed


@pytest.mark.parametrize(
    "arg", ["", ":0.8", "style.safetensors:", "style.safetensors:strong", "style:x"]
)
def test_lora_arg_with_bad_syntax_is_refused(arg):
    with pytest.raises(UserError, match=r"is not PATH\[:SCALE\]"):
        parse_lora_arg(arg)


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_lora_arg_with_non_finite_scale_is_refused(scale):
    with pytest.raises(UserError, match="is not a finite number"):
        parse_lora_arg(f"style.safetensors:{scale}")


def test_export_command_bakes_the_lora_and_records_it(tmp_path):
    import json

    from sdrt.cli import main

    lora = write_kohya_lora(tmp_path)
    bundle = tmp_path / "bundle"
    code = main(["export", "--random-weights", "tiny", str(bundle), "--lora", f"{lora.path}:0.5"])
    assert code == 0
    records = json.loads((bundle / "manifest.json").read_text())["loras"]
    assert [(r["file"], r["scale"]) for r in records] == [(lora.path.name, 0.5)]
    assert (
        main(
            [
                "export",
                "--random-weights",
                "tiny",
                str(tmp_path / "b2"),
                "--lora",
                str(tmp_path / "missing.safetensors"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "b2").exists()
