"""Run-time LoRA (`export --lora-rank`): an adapter loaded into the pool gives the image
diffusers gives with `load_lora_weights` + `set_adapters`, per request, in one denoiser call
shared with requests using other adapters or none, for the U-Net and the diffusion transformers
(SD3, Flux.1) with their CLIP encoders; bad adapters are refused in one line with the pool
unchanged."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pipeline_parity import PROMPT
from safetensors.torch import save_file
from test_lora import KOHYA_TE_LAYERS, KOHYA_UNET_LAYERS, KOHYA_UNET_Q, kohya_tensors
from test_security_bundle import keys  # noqa: F401, F811 - a fixture

from sdrt import Pipeline
from sdrt.errors import UserError
from sdrt.export.bundle_writer import export_bundle
from sdrt.export.load import random_pipeline
from sdrt.export.parity import run_diffusers

RANK = 8  # the bundle's R; the files below have rank 4
STEPS = 3
SCHEDULER = "euler"
CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
# diffusers' text-encoder loader infers the key format from attention keys: a file whose text
# part has only MLP layers fails there (state_dict_utils, "Could not automatically infer")
CLIP_MLP = ["v_proj", "fc1", "fc2"]
DIT_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
DIT_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


# sd-scripts' names of the tiny Flux's layers -> (in, out); the fused q/k/v give 3 x 32 outputs.
# Not single blocks' fused linear1: diffusers' converter cuts it at Flux.1's full-size widths.
KOHYA_FLUX_LAYERS = {
    "lora_unet_double_blocks_0_img_attn_qkv": (32, 96),
    "lora_unet_double_blocks_0_img_attn_proj": (32, 32),
    "lora_unet_double_blocks_0_img_mlp_0": (32, 128),
    "lora_unet_double_blocks_0_txt_attn_qkv": (32, 96),
    "lora_unet_double_blocks_0_txt_mlp_2": (128, 32),
    "lora_unet_single_blocks_0_linear2": (160, 32),
}


@dataclass(frozen=True)
class Model:
    """A tiny model the run-time LoRA tests run on: its adapters' peft targets per component
    (diffusers names), and the call both sides get."""

    preset: str
    family: str
    channels: int
    scheduler: str
    adapters: dict[str, dict[str, list[str]]]
    call: dict[str, Any] = field(default_factory=dict)  # both sides
    eager_call: dict[str, Any] = field(default_factory=dict)  # diffusers only


MODELS = {
    "tiny": Model(
        "tiny",
        "sd1",
        4,
        SCHEDULER,
        {
            "attn": {"unet": ["to_q", "to_k", "to_v", "to_out.0"]},
            "ff": {"unet": ["to_k", "ff.net.0.proj", "ff.net.2"]},
        },
    ),
    "tiny-sd3": Model(
        "tiny-sd3",
        "sd3",
        16,
        "flow_match_euler",
        {  # both streams, the dual attention, and both CLIPs; no T5 (diffusers loads none)
            "attn": {"transformer": [*DIT_ATTENTION, "to_add_out"], "text_encoder": CLIP_ATTENTION},
            "ff": {"transformer": ["to_v", *DIT_FEED_FORWARD], "text_encoder_2": CLIP_MLP},
        },
        {"guidance_scale": 4.0},
        {"max_sequence_length": 16},
    ),
    "tiny-flux": Model(
        "tiny-flux",
        "flux",
        16,
        "flow_match_euler",
        {  # double blocks' both streams, single blocks' q/k/v, proj_mlp and proj_out, CLIP-L
            "attn": {"transformer": [*DIT_ATTENTION, "to_add_out"], "text_encoder": CLIP_ATTENTION},
            "ff": {
                "transformer": [
                    *DIT_FEED_FORWARD,
                    "proj_mlp",
                    "single_transformer_blocks.0.proj_out",
                ],
                "text_encoder": CLIP_MLP,
            },
        },
        {"guidance_scale": 3.5},
        {"max_sequence_length": 16},
    ),
}


def peft_file(
    folder: Path,
    name: str,
    seed: int,
    targets: dict[str, list[str]],
    preset: str = "tiny",
    std: float = 0.2,
) -> Path:
    """A diffusers-saved peft adapter (alpha 2 in the metadata) on the tiny model of `preset`:
    `targets` are each component's peft target modules, factors drawn with deviation `std`."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = random_pipeline(preset, seed=0)
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, Any] = {}
    for component, modules in targets.items():
        model = getattr(pipe, component)
        config = LoraConfig(r=4, lora_alpha=2, target_modules=modules)
        inject_adapter_in_model(config, model)
        parts[f"{component}_lora_layers"] = {
            k: std * torch.randn(v.shape, generator=gen)
            for k, v in get_peft_model_state_dict(model).items()
        }
        parts[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(folder, weight_name=f"{name}.safetensors", **parts)
    return folder / f"{name}.safetensors"


@dataclass
class Setup:
    """A model's adapter files, its bundles exported with the branch (R = 8) and without, and
    the branch bundle's pipeline with every adapter loaded."""

    model: Model
    files: dict[str, Path]
    bundles: dict[str, Path]
    pipe: Pipeline


def build_setup(model: Model, folder: Path) -> Setup:
    files = {
        name: peft_file(folder, name, seed, targets, model.preset)
        for seed, (name, targets) in enumerate(model.adapters.items(), start=1)
    }
    kohya = {"sd1": KOHYA_UNET_LAYERS, "flux": KOHYA_FLUX_LAYERS}.get(model.family)
    if kohya:  # kohya files name the original model's layers
        files["kohya"] = folder / "kohya.safetensors"
        save_file(kohya_tensors({**kohya, **KOHYA_TE_LAYERS}, alpha=2.0, seed=3), files["kohya"])
    bundles = {"branch": folder / "branch", "plain": folder / "plain"}
    export_bundle(
        random_pipeline(model.preset, seed=0),
        bundles["branch"],
        model.family,
        lora_rank=RANK,
        progress=False,
    )
    export_bundle(
        random_pipeline(model.preset, seed=0), bundles["plain"], model.family, progress=False
    )
    pipe = Pipeline.load(bundles["branch"], device="cpu", max_loras=4)
    for name, path in files.items():
        pipe.load_lora(name, path)
    return Setup(model, files, bundles, pipe)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """preset -> its Setup, built once each."""
    built: dict[str, Setup] = {}

    def build(preset: str) -> Setup:
        if preset not in built:
            built[preset] = build_setup(MODELS[preset], tmp_path_factory.mktemp(preset))
        return built[preset]

    return build


@pytest.fixture(scope="module")
def files(setups) -> dict[str, Path]:
    return setups("tiny").files


@pytest.fixture(scope="module")
def bundles(setups) -> dict[str, Path]:
    return setups("tiny").bundles


@pytest.fixture(scope="module")
def pipe(setups) -> Pipeline:
    return setups("tiny").pipe


def latents(seed: int = 0, channels: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, channels, 8, 8), np.float32)


def ours(
    pipe: Pipeline, loras: dict[str, float], seed: int = 0, model: Model = MODELS["tiny"]
) -> np.ndarray:
    out = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        scheduler=model.scheduler,
        latents=latents(seed, model.channels),
        output_type="np",
        loras=loras,
        **model.call,
    )
    return out.images


def eager(setup: Setup, loras: dict[str, float]) -> np.ndarray:
    model = setup.model
    diffusers_pipe = random_pipeline(model.preset, seed=0)
    for name in loras:
        diffusers_pipe.load_lora_weights(str(setup.files[name]), adapter_name=name)
    diffusers_pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))
    return run_diffusers(
        diffusers_pipe,
        model.scheduler,
        latents(0, model.channels),
        prompt=PROMPT,
        num_inference_steps=STEPS,
        **model.call,
        **model.eager_call,
    )


ONE, TWO = {"attn": 1.0}, {"attn": 0.7, "ff": 0.5}


@pytest.mark.parametrize(
    ("preset", "loras"),
    [
        ("tiny", ONE),
        ("tiny", TWO),
        ("tiny", {"kohya": 1.0}),
        ("tiny-sd3", ONE),
        ("tiny-sd3", TWO),
        ("tiny-flux", ONE),
        ("tiny-flux", TWO),
        ("tiny-flux", {"kohya": 1.0}),
    ],
    ids=[
        "unet-one",
        "unet-two-stacked",
        "unet-kohya-with-text-encoder",
        "sd3-one-with-clip-l",
        "sd3-two-stacked-with-clip-g",
        "flux-one-with-clip",
        "flux-two-stacked",
        "flux-kohya-fused-qkv-with-text-encoder",
    ],
)
def test_adapters_match_diffusers_set_adapters(setups, preset, loras):
    setup = setups(preset)
    got, want = ours(setup.pipe, loras, model=setup.model), eager(setup, loras)
    base = ours(setup.pipe, {}, model=setup.model)
    assert np.abs(want - base).max() > 1e-2  # the adapters change the image
    assert np.abs(got - want).max() <= 1e-4


def test_kohya_text_encoder_part_is_applied(pipe, files):
    """The kohya file's text-encoder layers alone change the prompt embeddings as diffusers'."""
    diffusers_pipe = random_pipeline("tiny", seed=0)
    diffusers_pipe.load_lora_weights(str(files["kohya"]), adapter_name="kohya")
    ids = diffusers_pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        want = diffusers_pipe.text_encoder(ids)[0].numpy()
    hold = pipe.adapters.hold({"kohya": 1.0})
    try:
        got = pipe.family.encode_text(pipe, [PROMPT], hold.rows(1))["encoder_hidden_states"]
    finally:
        hold.release()
    plain = pipe.family.encode_text(pipe, [PROMPT])["encoder_hidden_states"]
    assert np.abs(want - plain).max() > 1e-3
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("preset", list(MODELS))
def test_three_requests_share_each_denoiser_call_and_match_their_own_runs(setups, preset):
    from sdrt.serve.batcher import Batcher

    setup = setups(preset)
    model, pipe = setup.model, setup.pipe
    requests = [{"attn": 1.0}, {"ff": 0.5}, {}]
    alone = [ours(pipe, loras, seed, model) for seed, loras in enumerate(requests)]
    batcher = Batcher(pipe, max_batch_rows=6)
    futures = [
        batcher.submit(
            {
                "prompt": PROMPT,
                "num_inference_steps": STEPS,
                "scheduler": model.scheduler,
                "latents": latents(seed, model.channels),
                "output_type": "np",
                "loras": loras,
                **model.call,
            }
        )
        for seed, loras in enumerate(requests)
    ]  # all queued before the worker starts: admitted together
    batcher.start()
    try:
        together = [future.result(timeout=120).images for future in futures]
    finally:
        batcher.stop()
    stats = batcher.stats()
    assert stats.unet_calls == STEPS and stats.requests_per_call == {3: STEPS}
    for got, want in zip(together, alone, strict=True):
        assert np.abs(got - want).max() <= 1e-5
    plain = Pipeline.load(setup.bundles["plain"], device="cpu")
    without = plain(
        PROMPT,
        num_inference_steps=STEPS,
        scheduler=model.scheduler,
        latents=latents(2, model.channels),
        output_type="np",
        **model.call,
    ).images
    assert np.abs(together[2] - without).max() <= 1e-6


def pool_state(pipe: Pipeline) -> tuple[list[dict], dict[str, bytes]]:
    banks = {
        name: bank.tobytes()
        for component in pipe.adapters.banks.values()
        for name, bank in component.items()
    }
    return pipe.loras(), banks


def write_kohya(path: Path, layers: dict[str, tuple[int, int]], rank: int = 4, **extra) -> Path:
    tensors = kohya_tensors(layers, alpha=1.0, seed=5)
    if rank != 4:
        tensors = {
            k: torch.randn(rank, v.shape[1]) if k.endswith("down.weight") else v
            for k, v in tensors.items()
        }
        tensors = {
            k: torch.randn(v.shape[0], rank) if k.endswith("up.weight") else v
            for k, v in tensors.items()
        }
    save_file({**tensors, **extra}, path)
    return path


def one_value(shape: tuple[int, int], value: float) -> torch.Tensor:
    """Small factors with a single `value` among them."""
    tensor = torch.full(shape, 0.01)
    tensor[shape[0] // 2, shape[1] // 2] = value
    return tensor


BAD_FILES = {
    "rank above R": (
        lambda d: write_kohya(d / "big.safetensors", KOHYA_UNET_LAYERS, rank=RANK + 1),
        "rank 9, above this bundle's LoRA rank 8",
    ),
    "layer not in bundle": (
        lambda d: write_kohya(
            d / "other.safetensors", {"lora_unet_time_embedding_linear_1": (32, 128)}
        ),
        "lora_unet_time_embedding_linear_1', which has no LoRA branch",
    ),
    "corrupt file": (
        lambda d: (
            (d / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
            and d / "corrupt.safetensors"
        ),
        "could not read LoRA file corrupt.safetensors as safetensors",
    ),
    "conv LoRA (LoCon)": (
        lambda d: write_kohya(
            d / "locon.safetensors",
            KOHYA_UNET_LAYERS,
            **{
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(
                    4, 32, 3, 3
                ),
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(32, 4, 1, 1),
            },
        ),
        "adapts convolution layers or is not a plain LoRA",
    ),
    "NaN in a factor": (
        lambda d: write_kohya(
            d / "nan.safetensors",
            KOHYA_UNET_LAYERS,
            **{f"{KOHYA_UNET_Q}.lora_down.weight": one_value((4, 64), float("nan"))},
        ),
        "attn1.to_q holds NaN or infinity",
    ),
    "infinity in a factor": (
        lambda d: write_kohya(
            d / "inf.safetensors",
            KOHYA_UNET_LAYERS,
            **{f"{KOHYA_UNET_Q}.lora_up.weight": one_value((64, 4), float("inf"))},
        ),
        "attn1.to_q holds NaN or infinity",
    ),
    "pickle file": (
        lambda d: (d / "old.ckpt").write_bytes(b"x") and d / "old.ckpt",
        "not a .safetensors file",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_adapter_file_is_one_line_and_leaves_the_pool_unchanged(pipe, tmp_path, case):
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    before = pool_state(pipe)
    with pytest.raises(UserError, match=message) as err:
        pipe.load_lora("bad", path)
    assert "\n" not in str(err.value)
    assert pool_state(pipe) == before


def test_unknown_adapter_name_and_too_much_rank_are_refused(pipe):
    with pytest.raises(UserError, match="unknown LoRA 'nope'"):
        pipe("x", num_inference_steps=1, loras={"nope": 1.0})
    with pytest.raises(UserError, match="rank 12 together, above this bundle's LoRA rank 8"):
        pipe("x", num_inference_steps=1, loras={"attn": 1.0, "ff": 1.0, "kohya": 1.0})
    assert all(entry["in_use"] == 0 for entry in pipe.loras())


def test_full_pool_evicts_least_recently_used_never_one_in_use(bundles, files):
    small = Pipeline.load(bundles["branch"], device="cpu", max_loras=2)
    small.load_lora("a", files["attn"])
    small.load_lora("b", files["ff"])
    hold = small.adapters.hold({"a": 1.0})  # a request using "a" is in flight
    try:
        small.load_lora("c", files["kohya"])  # evicts "b", the unused one
        assert [entry["name"] for entry in small.loras()] == ["a", "c"]
        with pytest.raises(UserError, match="in use"):
            small.unload_lora("a")
        hold_c = small.adapters.hold({"c": 1.0})
        with pytest.raises(UserError, match="all 2 slots hold adapters in use"):
            small.load_lora("d", files["ff"])
        hold_c.release()
    finally:
        hold.release()
    small.unload_lora("a")
    assert [entry["name"] for entry in small.loras()] == ["c"]


def test_loading_while_requests_run_changes_no_running_image(pipe, files, tmp_path):
    """Loads write free slots only: requests running meanwhile give their usual images."""
    want = ours(pipe, {"attn": 1.0})
    results = []
    worker = threading.Thread(target=lambda: results.append(ours(pipe, {"attn": 1.0})))
    worker.start()
    for _ in range(3):
        pipe.load_lora("extra", files["ff"])
        pipe.unload_lora("extra")
    worker.join()
    assert np.abs(results[0] - want).max() == 0.0


def test_generate_command_applies_named_loras(bundles, files, pipe, tmp_path, capsys):
    from PIL import Image

    from sdrt.cli import main

    out = tmp_path / "x.png"
    common = [str(bundles["branch"]), "--prompt", PROMPT, "--steps", "2", "--seed", "1"]
    lora = ["--lora", f"attn={files['attn']}:0.5"]
    assert main(["generate", *common, *lora, "--device", "cpu", "--output", str(out)]) == 0
    call = {"num_inference_steps": 2, "seed": 1, "output_type": "np"}
    want = (pipe(PROMPT, loras={"attn": 0.5}, **call).images[0] * 255).round()
    assert np.abs(np.asarray(Image.open(out).convert("RGB"), np.float32) - want).max() <= 1
    assert main(["generate", *common, "--lora", "attn", "--output", str(out)]) == 2
    assert "is not NAME=PATH[:SCALE]" in capsys.readouterr().err


def test_manifest_records_rank_and_the_attention_and_feed_forward_layers(bundles):
    import json

    manifest = json.loads((bundles["branch"] / "manifest.json").read_text())
    branch = manifest["lora_branch"]
    unet = {layer["name"] for layer in branch["layers"]["unet"]}
    text = {layer["name"] for layer in branch["layers"]["text_encoder"]}
    block = "down_blocks.1.attentions.0.transformer_blocks.0"
    assert branch["rank"] == RANK
    assert {f"{block}.attn2.to_k", f"{block}.attn1.to_out.0", f"{block}.ff.net.2"} <= unet
    assert len(unet) == 4 * 10  # 4 transformer blocks x (2 x q/k/v/out + 2 feed-forward)
    assert "encoder.layers.1.mlp.fc1" in text and len(text) == 2 * 6
    assert not any("time_emb" in name or "conv" in name for name in unet)
    inputs = {spec["name"] for spec in manifest["components"]["unet"]["inputs"]}
    assert {"lora_index", "lora_scale", f"lora_a.{block}.attn1.to_q"} <= inputs
    assert "lora_branch" not in json.loads((bundles["plain"] / "manifest.json").read_text())


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_transformer_branch_covers_attention_and_feed_forward_not_modulation_or_t5(setups, preset):
    import json

    setup = setups(preset)
    manifest = json.loads((setup.bundles["branch"] / "manifest.json").read_text())
    layers = {
        component: {layer["name"] for layer in records}
        for component, records in manifest["lora_branch"]["layers"].items()
    }
    block = "transformer_blocks.0"
    both_streams = {f"{block}.attn.to_q", f"{block}.attn.add_v_proj", f"{block}.attn.to_add_out"}
    feed_forward = {f"{block}.ff.net.0.proj", f"{block}.ff_context.net.2"}
    if preset == "tiny-sd3":  # MMDiT-X's second attention; the last block has no context out
        own, count, t5 = {f"{block}.attn2.to_k", "transformer_blocks.1.attn.add_k_proj"}, 25, 3
    else:  # Flux's single blocks
        single = "single_transformer_blocks.0"
        own, count, t5 = {f"{single}.attn.to_v", f"{single}.proj_mlp", f"{single}.proj_out"}, 17, 2
    assert both_streams | feed_forward | own <= layers["transformer"]
    assert len(layers["transformer"]) == count
    assert not any(".norm" in name or name == "proj_out" for name in layers["transformer"])
    assert "encoder.layers.0.self_attn.q_proj" in layers["text_encoder"]
    assert f"text_encoder_{t5}" not in layers  # T5: diffusers' loaders load no LoRA into it


def test_dit_adapter_for_the_modulation_layers_is_refused_in_one_line(setups, tmp_path):
    pipe = setups("tiny-flux").pipe
    path = peft_file(tmp_path, "mod", 5, {"transformer": ["norm1.linear"]}, "tiny-flux")
    before = pool_state(pipe)
    with pytest.raises(
        UserError, match=r"adapts 'transformer\.transformer_blocks\.0\.norm1\.linear'"
    ):
        pipe.load_lora("mod", path)
    assert pool_state(pipe) == before


def test_kohya_flux_fused_linear1_feeds_q_k_v_and_mlp_their_rows(setups, tmp_path):
    """Single blocks' linear1 (q, k, v and the MLP in one projection): each layer gets the
    shared down factor and its rows of the up factor, alpha / rank folded in."""
    from test_lora import RANK as KOHYA_RANK

    from sdrt.lora_files import read_adapter

    branch = setups("tiny-flux").pipe.manifest["lora_branch"]
    stem = "lora_unet_single_blocks_0_linear1"
    tensors = kohya_tensors({stem: (32, 3 * 32 + 128)}, alpha=2.0, seed=7)
    save_file(tensors, tmp_path / "linear1.safetensors")
    layers = read_adapter(tmp_path / "linear1.safetensors", branch).layers["transformer"]
    down = tensors[f"{stem}.lora_down.weight"].numpy()
    up = tensors[f"{stem}.lora_up.weight"].numpy() * 2.0 / KOHYA_RANK
    rows = {"attn.to_q": (0, 32), "attn.to_k": (32, 64), "attn.to_v": (64, 96)}
    for layer, (start, stop) in {**rows, "proj_mlp": (96, 224)}.items():
        got = layers[f"single_transformer_blocks.0.{layer}"]
        assert np.array_equal(got.down, down)
        assert np.allclose(got.up * got.alpha_over_rank, up[start:stop], rtol=0, atol=1e-7)
    save_file(kohya_tensors({stem: (32, 200)}, 1.0, 7), tmp_path / "narrow.safetensors")
    with pytest.raises(UserError, match="not a fused projection of 32 \\+ 32 \\+ 32 \\+ 128"):
        read_adapter(tmp_path / "narrow.safetensors", branch)


def test_static_sizes_with_the_branch_are_refused_before_export(tmp_path):
    with pytest.raises(UserError, match="--lora-rank cannot be combined with --static-size"):
        export_bundle(
            random_pipeline("tiny", seed=0),
            tmp_path / "b",
            "sd1",
            lora_rank=4,
            static_sizes=[(64, 64)],
            progress=False,
        )
    assert not (tmp_path / "b").exists()


def test_with_a_trusted_key_only_adapters_signed_by_its_pair_load(bundles, files, keys, tmp_path):  # noqa: F811
    import shutil

    from sdrt.cli import main

    signed_pipe = Pipeline.load(bundles["branch"], device="cpu")
    signed_pipe.adapters.trusted_key = keys["ours_public"]
    path = Path(shutil.copy(files["attn"], tmp_path / "attn.safetensors"))
    with pytest.raises(UserError, match=r"attn.safetensors is not signed \(attn.safetensors.sig"):
        signed_pipe.load_lora("attn", path)
    assert main(["sign", str(path), "--key", str(keys["ours_private"])]) == 0
    signed_pipe.load_lora("attn", path)
    other = Path(shutil.copy(files["ff"], tmp_path / "ff.safetensors"))
    assert main(["sign", str(other), "--key", str(keys["theirs_private"])]) == 0
    with pytest.raises(UserError, match="fails signature verification"):
        signed_pipe.load_lora("ff", other)
    with path.open("ab") as f:
        f.write(b" ")  # changed after signing
    with pytest.raises(UserError, match="fails signature verification"):
        signed_pipe.load_lora("attn2", path)
    assert [entry["name"] for entry in signed_pipe.loras()] == ["attn"]
