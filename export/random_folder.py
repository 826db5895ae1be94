"""Write a full-size random-weight diffusers folder, one shard at a time.

A published architecture with random weights is what the benchmarks and the export memory
targets need; at full size it cannot be built in RAM (Flux.1: 47.6 GB in fp32). The modules are
built without memory (`lazy_weights.empty_weights`), then initialised a few layers at a time
with their own init and written to safetensors shards in bfloat16, as the published
checkpoints ship; the folder then exports through the same code as a downloaded one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .lazy_weights import empty_weights

SHARD_BYTES = 2**30  # of bf16 data per shard (safetensors builds each in memory to write it)
UNIT_BYTES = 2**29  # fp32 bytes initialised at once


def write_random_folder(preset: str, folder: Path, seed: int = 0, progress: bool = True) -> None:
    """The preset's pipeline as a diffusers folder (model_index.json, configs, tokenizers,
    scheduler, bf16 safetensors shards) in `folder`."""
    from .load import random_pipeline

    with empty_weights():
        pipe = random_pipeline(preset, seed=seed)
    pipe.save_config(folder)  # model_index.json
    torch.manual_seed(seed)
    for name, part in pipe.components.items():
        target = folder / name
        if isinstance(part, torch.nn.Module):
            _write_model(part, target, progress)
        elif part is not None:
            part.save_pretrained(target)  # tokenizers and the scheduler


def _write_model(model: torch.nn.Module, folder: Path, progress: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    diffusers_model = hasattr(model, "save_config")
    if diffusers_model:
        model.save_config(folder)
    else:
        model.config.save_pretrained(folder)
    stem = "diffusion_pytorch_model" if diffusers_model else "model"
    total = sum(p.numel() for p in model.parameters())
    bar = tqdm(total=total, desc=f"random {folder.name}", unit="param", unit_scale=True,
               disable=not progress)  # fmt: skip
    current: dict[str, torch.Tensor] = {}
    weight_map: dict[str, int] = {}  # key -> shard number, from 1
    count = 0
    written: set[tuple[int, str]] = set()  # (owning module, attribute): tied weights once
    for names in _units(model, ""):
        names = [n for n in names if _slot(model, n) not in written]
        written.update(_slot(model, n) for n in names)
        for key, tensor in _initialised(model, names).items():
            if current and sum(t.numel() * 2 for t in current.values()) >= SHARD_BYTES:
                count = _save_shard(current, folder, stem, count)
                current = {}
            current[key] = tensor
            weight_map[key] = count + 1
            bar.update(tensor.numel())
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for key, buffer in model.state_dict().items():  # persistent buffers, as save_pretrained
        if key not in params:
            current[key] = buffer.detach().clone()
            weight_map[key] = count + 1
    count = _save_shard(current, folder, stem, count)
    bar.close()
    files = {i: f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i, name in files.items():
        (folder / f"{stem}-{i:05d}.safetensors").rename(folder / name)
    index = {
        "metadata": {"total_size": total * 2},
        "weight_map": {key: files[shard] for key, shard in weight_map.items()},
    }
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _slot(model: torch.nn.Module, name: str) -> tuple[int, str]:
    path, _, attr = name.rpartition(".")
    return id(model.get_submodule(path)), attr


def _save_shard(tensors: dict[str, torch.Tensor], folder: Path, stem: str, count: int) -> int:
    """Write shard number count + 1 (renamed once the total is known); returns its number."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / f"{stem}-{count + 1:05d}.safetensors"), {"format": "pt"})
    return count + 1


def _units(module: torch.nn.Module, prefix: str) -> Iterator[list[str]]:
    """Parameter names in groups of at most UNIT_BYTES (fp32): a whole submodule where it fits,
    else its own parameters, then each child's groups."""
    named = dict(module.named_parameters(prefix=prefix.rstrip(".")))
    if sum(p.numel() * 4 for p in named.values()) <= UNIT_BYTES:
        if named:
            yield list(named)
        return
    own = [prefix + n for n, p in module._parameters.items() if p is not None]
    if own:
        yield own
    for child_name, child in module.named_children():
        yield from _units(child, f"{prefix}{child_name}.")


def _initialised(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The `names` parameters of `model` made real, initialised as the model's own init does
    (each layer's reset_parameters, then a transformers model's _init_weights), in bf16; the
    parameters go back to the meta device afterwards."""
    owners: dict[str, tuple[torch.nn.Module, str]] = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        owners[name] = (model.get_submodule(path), attr)
    touched = {id(owner): owner for owner, _ in owners.values()}
    for owner, attr in owners.values():
        meta = owner._parameters[attr]
        owner._parameters[attr] = torch.nn.Parameter(torch.empty(meta.shape), False)
    modules = list(touched.values())
    for module in modules:
        if hasattr(module, "reset_parameters") and not _reaches_beyond(module, touched):
            module.reset_parameters()
        else:
            for param in module._parameters.values():
                if param is not None:
                    torch.nn.init.normal_(param, std=0.02)
    hf_init = getattr(model, "_init_weights", None)
    if hf_init is not None:
        for module in reversed(_ancestors_within(model, names)):  # children first, as apply()
            hf_init(module)
    out = {}
    for name, (owner, attr) in owners.items():
        out[name] = owner._parameters[attr].detach().to(torch.bfloat16)
        owner._parameters[attr] = torch.nn.Parameter(
            torch.empty(owner._parameters[attr].shape, device="meta"), False
        )
    return out


def _reaches_beyond(module: torch.nn.Module, touched: dict[int, Any]) -> bool:
    """Whether `module`'s reset_parameters would touch parameters of children not made real."""
    return any(
        id(child) not in touched and any(True for _ in child.parameters())
        for child in module.children()
    )


def _ancestors_within(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Module]:
    """The modules whose every parameter is in `names` (made real), for `_init_weights`,
    which initialises a module's children from the module (T5's gated feed-forward)."""
    real = set(names)
    found = []
    for path, module in model.named_modules():
        params = [f"{path}.{n}" if path else n for n, _ in module.named_parameters()]
        if params and all(p in real for p in params):
            found.append(module)
    return found
