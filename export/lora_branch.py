"""Give the denoiser's (U-Net or diffusion transformer) and CLIP text encoders' Linear layers a
low-rank branch fed by graph inputs, so LoRAs are applied at run time, per row, without touching
the frozen weights (`--lora-rank R`).

Each targeted Linear computes `y = W x + ((x A_r^T) * s) B_r`, where for each row of the batch
`A_r = A_bank[index_row]` (rank columns x in) and `B_r = B_bank[index_row]` (rank columns x out)
are gathered from the layer's bank, a graph input of `lora_bank` rows: the runtime's adapter
pool (`sdrt.lora`). Slot k holds rows k*R .. k*R+R-1, slot 0 is zeros.

The index and scale are per row *and per rank column* (`lora_index`, `lora_scale`:
[batch, lora_rank]): a request with several adapters picks the rank columns of each from its
own slot, so stacking needs no combined copy in the pool, each adapter keeps its own scale,
and a row without adapters gathers zeros and computes exactly W x. `lora_rank` is a dynamic
dimension up to R: a batch without adapters runs a rank-1 branch, not a rank-R one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sdrt.lora_files import TEXT_PREFIX
from sdrt.lora_pool import INDEX, SCALE, bank_inputs

from .onnx_export import Component, TensorSpec

# per component, the batch dimension its rows are counted in
ROW_DIM = {
    "unet": "unet_batch",
    "transformer": "unet_batch",
    "text_encoder": "batch",
    "text_encoder_2": "batch",  # SDXL's and SD3's CLIP-G; Flux's T5, which has no targets
}
# The Linear layers of attention and feed-forward: a module path that holds one of these parts
# (U-Net and SD3/Flux transformer blocks, the U-Net's block projections, CLIP encoder layers).
# That is what diffusers' SD3 and Flux LoRA loaders load and its training scripts target: both
# attention streams (to_q/k/v/out.0, add_q/k/v_proj, to_add_out), ff and ff_context, Flux's
# single blocks' proj_mlp/proj_out. Not targeted: the AdaLN modulation Linears (`norm*.linear`,
# over the per-row time embedding rather than tokens), the embedders, and T5, whose LoRAs
# diffusers' SD3/Flux loaders do not load (no `text_encoder_3` / T5 in _lora_loadable_modules).
TARGET_PARTS = (".transformer_blocks.", ".single_transformer_blocks.", ".encoder.layers.")
TARGET_ENDS = (".proj_in", ".proj_out")
CALIBRATION_RANK = 4


def layer_name(module_path: str) -> str:
    """transformers 5 dropped CLIPTextModel's `text_model.` level; layer names leave it out so
    a bundle's names do not depend on the transformers version that exported it."""
    return module_path.removeprefix(TEXT_PREFIX)


class _Feeds:
    """The branch inputs of the current forward call, shared by a component's branches."""

    index: torch.Tensor
    scale: torch.Tensor
    banks: dict[str, tuple[torch.Tensor, torch.Tensor]]


class LoraLinear(torch.nn.Module):
    """A frozen Linear plus the run-time low-rank branch over [rows, tokens, features]."""

    def __init__(self, base: torch.nn.Linear, name: str, feeds: _Feeds) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.feeds = feeds
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank_a, bank_b = self.feeds.banks[self.name]
        down = bank_a[self.feeds.index]  # [rows, rank, in]
        up = bank_b[self.feeds.index]  # [rows, rank, out]
        hidden = torch.matmul(x, down.transpose(1, 2)) * self.feeds.scale.unsqueeze(1)
        return self.base(x) + torch.matmul(hidden, up)


class _WithBranches(torch.nn.Module):
    """A component's module with the branch inputs appended to its own positional inputs."""

    def __init__(self, inner: torch.nn.Module, own_inputs: int, layers: list[str], feeds: _Feeds):
        super().__init__()
        self.inner = inner
        self.own_inputs = own_inputs
        self.layers = layers
        self.feeds = feeds

    def forward(self, *args: torch.Tensor) -> Any:
        own, index, scale, banks = (
            args[: self.own_inputs],
            args[self.own_inputs],
            args[self.own_inputs + 1],
            args[self.own_inputs + 2 :],
        )
        self.feeds.index, self.feeds.scale = index, scale
        self.feeds.banks = {
            name: (banks[2 * i], banks[2 * i + 1]) for i, name in enumerate(self.layers)
        }
        return self.inner(*own)


def target_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Module path -> Linear for every attention and feed-forward Linear of `model`."""
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (any(part in f".{path}" for part in TARGET_PARTS) or path.endswith(TARGET_ENDS))
        and not any(step.startswith("norm") for step in path.split("."))
    }


def add_branches(component: Component, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Replace every targeted Linear of `model` (the component's diffusers/transformers model)
    by a `LoraLinear`, extend `component` with the branch inputs, and return the layer records
    (name, in, out) for the manifest."""
    feeds = _Feeds()
    layers = target_layers(model)
    records = []
    for path, linear in layers.items():
        parent, _, child = path.rpartition(".")
        name = layer_name(path)
        model.get_submodule(parent).register_module(child, LoraLinear(linear, name, feeds))
        records.append({"name": name, "in": linear.in_features, "out": linear.out_features})
    rows = ROW_DIM[component.name]
    extra = [
        TensorSpec(INDEX, "int64", [rows, "lora_rank"]),
        TensorSpec(SCALE, "float32", [rows, "lora_rank"]),
    ]
    for record in records:
        down, up = bank_inputs(record["name"])
        extra += [
            TensorSpec(down, "float32", ["lora_bank", record["in"]]),
            TensorSpec(up, "float32", ["lora_bank", record["out"]]),
        ]
    component.module = _WithBranches(
        component.module, len(component.inputs), [r["name"] for r in records], feeds
    )
    component.inputs = component.inputs + extra
    component.calibration = [
        feed | calibration_branch(feed, extra) for feed in component.calibration
    ]
    return records


def calibration_branch(feed: dict[str, np.ndarray], extra: list[TensorSpec]) -> dict[str, Any]:
    """Branch inputs for an fp16 calibration feed of the plain component: two adapter slots of
    small random factors, each row using one, so the branch's activations are measured too."""
    rng = np.random.default_rng(0)
    rows = len(next(iter(feed.values())))
    bank = 2 * CALIBRATION_RANK
    values: dict[str, Any] = {
        INDEX: rng.integers(0, bank, (rows, CALIBRATION_RANK)),
        SCALE: np.ones((rows, CALIBRATION_RANK), np.float32),
    }
    for spec in extra[2:]:
        values[spec.name] = 0.05 * rng.standard_normal((bank, spec.shape[1])).astype(np.float32)
    return values


def with_branches(pipe: Any, parts: list[Component], rank: int) -> dict[str, Any]:
    """Add the branches to the denoiser and the text encoders of `parts` that have targeted
    layers (not T5); the manifest's `lora_branch` record: R and the targeted layers per
    component."""
    models = {part.name: getattr(pipe, part.name) for part in parts if part.name in ROW_DIM}
    layers = {
        part.name: add_branches(part, models[part.name])
        for part in parts
        if part.name in models and target_layers(models[part.name])
    }
    return {"rank": rank, "layers": layers}


def branch_dims(rank: int, check: bool) -> dict[str, int]:
    """Sizes of the branch dimensions for tracing, and other ones for the check that proves
    them dynamic; random banks of a few slots."""
    return {"lora_rank": min(rank, 3 if check else 2), "lora_bank": (4 if check else 3) * rank}
