"""Run-time LoRA (`export --lora-rank`): an adapter loaded into the pool gives the image
diffusers gives with `load_lora_weights` + `set_adapters`, per request, in one U-Net call
shared with requests using other adapters or none; bad adapters are refused in one line with
the pool unchanged."""

from __future__ import annotations

import threading
from pathlib import Path

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


def peft_file(folder: Path, name: str, seed: int, targets: list[str]) -> Path:
    """A diffusers-saved peft adapter (alpha 2 in the metadata) on the tiny U-Net."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = random_pipeline("tiny", seed=0).unet
    config = LoraConfig(r=4, lora_alpha=2, target_modules=targets)
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        k: 0.2 * torch.randn(v.shape, generator=gen)
        for k, v in get_peft_model_state_dict(unet).items()
    }
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=tensors,
        weight_name=f"{name}.safetensors",
        unet_lora_adapter_metadata=config.to_dict(),
    )
    return folder / f"{name}.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    kohya = folder / "kohya.safetensors"
    save_file(kohya_tensors({**KOHYA_UNET_LAYERS, **KOHYA_TE_LAYERS}, alpha=2.0, seed=3), kohya)
    return {
        "attn": peft_file(folder, "attn", 1, ["to_q", "to_k", "to_v", "to_out.0"]),
        "ff": peft_file(folder, "ff", 2, ["to_k", "ff.net.0.proj", "ff.net.2"]),
        "kohya": kohya,
    }


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The tiny model exported with the branch (R = 8) and without it."""
    folder = tmp_path_factory.mktemp("lora_bundles")
    export_bundle(random_pipeline("tiny", seed=0), folder / "branch", "sd1", lora_rank=RANK)
    export_bundle(random_pipeline("tiny", seed=0), folder / "plain", "sd1")
    return {"branch": folder / "branch", "plain": folder / "plain"}


@pytest.fixture(scope="module")
def pipe(bundles, files) -> Pipeline:
    loaded = Pipeline.load(bundles["branch"], device="cpu", max_loras=4)
    for name, path in files.items():
        loaded.load_lora(name, path)
    return loaded


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8), np.float32)


def ours(pipe: Pipeline, loras: dict[str, float], seed: int = 0) -> np.ndarray:
    out = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        scheduler=SCHEDULER,
        latents=latents(seed),
        output_type="np",
        loras=loras,
    )
    return out.images


def eager(files: dict[str, Path], loras: dict[str, float]) -> np.ndarray:
    diffusers_pipe = random_pipeline("tiny", seed=0)
    for name in loras:
        diffusers_pipe.load_lora_weights(str(files[name]), adapter_name=name)
    diffusers_pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))
    return run_diffusers(
        diffusers_pipe, SCHEDULER, latents(), prompt=PROMPT, num_inference_steps=STEPS
    )


@pytest.mark.parametrize(
    "loras",
    [{"attn": 1.0}, {"attn": 0.7, "ff": 0.5}, {"kohya": 1.0}],
    ids=["one", "two-stacked", "kohya-with-text-encoder"],
)
def test_adapters_match_diffusers_set_adapters(pipe, files, loras):
    got, want = ours(pipe, loras), eager(files, loras)
    base = ours(pipe, {})
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


def test_three_requests_share_each_unet_call_and_match_their_own_runs(pipe, bundles):
    from sdrt.serve.batcher import Batcher

    requests = [{"attn": 1.0}, {"ff": 0.5}, {}]
    alone = [ours(pipe, loras, seed) for seed, loras in enumerate(requests)]
    batcher = Batcher(pipe, max_batch_rows=6)
    futures = [
        batcher.submit(
            {
                "prompt": PROMPT,
                "num_inference_steps": STEPS,
                "scheduler": SCHEDULER,
                "latents": latents(seed),
                "output_type": "np",
                "loras": loras,
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
    plain = Pipeline.load(bundles["plain"], device="cpu")
    without = plain(
        PROMPT, num_inference_steps=STEPS, scheduler=SCHEDULER, latents=latents(2), output_type="np"
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
