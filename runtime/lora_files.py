"""Read a LoRA file (diffusers/peft or kohya naming) into per-layer low-rank factors for a
bundle's run-time branch, torch-free (safetensors' numpy API).

A layer's update is `scale * (alpha / rank) * up @ down`; the factor alpha / rank is folded
into `up` as the pool copies it into its bank (one pass, no intermediate copy), so the pool
holds ready-to-use factors and a request's scale is the only number the graph multiplies by.
The checks a user can act on happen before anything is put in the pool: the file is read
whole first.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

LORA_SUFFIX = ".safetensors"
# diffusers' safetensors metadata key holding each component's peft LoraConfig, as
# "<component>.<field>" (diffusers/loaders/lora_base.py, LORA_ADAPTER_METADATA_KEY)
ADAPTER_METADATA = "lora_adapter_metadata"
# kohya prefixes: SD 1/2 have one text encoder, SDXL two
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# sd-scripts' Flux.1 names (the original model's modules) -> the diffusers layers each feeds, in
# the order a fused projection's outputs are cut (diffusers' lora_conversion_utils, kohya Flux):
# the fused layers share the down factor, and the up factor is split along the outputs.
KOHYA_FLUX = {
    "lora_unet_double_blocks_{}_": (
        "transformer_blocks.{}.",
        {
            "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_attn_proj": ("attn.to_out.0",),
            "img_mlp_0": ("ff.net.0.proj",),
            "img_mlp_2": ("ff.net.2",),
            "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_attn_proj": ("attn.to_add_out",),
            "txt_mlp_0": ("ff_context.net.0.proj",),
            "txt_mlp_2": ("ff_context.net.2",),
        },
    ),
    "lora_unet_single_blocks_{}_": (
        "single_transformer_blocks.{}.",
        {
            "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            "linear2": ("proj_out",),
        },
    ),
}
DOWN = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight")
UP = (".lora_B.weight", ".lora_up.weight", ".lora.up.weight")
ALPHA = ".alpha"
# kohya / LyCORIS parts of adapters that are not a plain low-rank pair
OTHER_KINDS = ("lora_mid", "hada_", "lokr_", ".diff", "dora_scale")
TEXT_PREFIX = "text_model."  # CLIP's module level that layer names leave out


@dataclass
class Factors:
    """One layer's checked factors as the file holds them, float32: down [rank, in],
    up [out, rank]; and alpha / rank, which the pool folds into up as it copies it."""

    down: np.ndarray
    up: np.ndarray
    alpha_over_rank: float


@dataclass
class Adapter:
    """A LoRA file as factors per component and layer."""

    file: str
    rank: int
    layers: dict[str, dict[str, Factors]]
    size: int  # bytes of the factors


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`PATH[:SCALE]` from `--lora`; the scale defaults to 1.0.

    A colon separates a scale only when a number follows it, so a path with a colon in it
    (a Windows drive) still works when it ends in .safetensors.
    """
    path, sep, tail = arg.rpartition(":")
    if sep and path and _is_number(tail):
        return path, check_scale(float(tail), path)
    if arg and (not sep or arg.lower().endswith(LORA_SUFFIX)):
        return arg, 1.0
    raise UserError(
        f"--lora {arg!r} is not PATH[:SCALE]; pass e.g. --lora style.safetensors:0.8 "
        "(SCALE a number, 1.0 when left out)"
    )


def parse_named_lora_arg(arg: str) -> tuple[str, str, float]:
    """`NAME=PATH[:SCALE]` from `generate --lora`: (name, path, scale)."""
    name, sep, rest = arg.partition("=")
    if not sep or not name or not rest:
        raise UserError(
            f"--lora {arg!r} is not NAME=PATH[:SCALE]; pass e.g. --lora "
            "style=style.safetensors:0.8 (SCALE 1.0 when left out)"
        )
    path, scale = parse_lora_arg(rest)
    return name, path, scale


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_scale(scale: Any, name: str) -> float:
    """A LoRA scale as a finite float; NaN or infinity would silently wreck every output."""
    if (
        isinstance(scale, bool)
        or not isinstance(scale, numbers.Real)
        or not math.isfinite(float(scale))
    ):
        raise UserError(
            f"LoRA scale {scale!r} for {name} is not a finite number; use e.g. 0.8 (1.0 is full "
            "strength, 0 disables it)"
        )
    return float(scale)


def check_lora_file(path: str | Path) -> Path:
    """An existing .safetensors file; pickle formats (.ckpt, .pt, .bin) can run code when read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {str(path)!r} does not exist; check the path")
    if path.suffix.lower() != LORA_SUFFIX:
        raise UserError(
            f"LoRA file {path.name} is not a .safetensors file; only safetensors are read, "
            "since other formats can run code when loaded: convert it to .safetensors first"
        )
    return path


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file as numpy, and its metadata; one line on a bad file."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as err:
        raise UserError(
            "reading LoRA files needs safetensors; run `pip install 'sdrt[lora]'`"
        ) from err
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - no iter
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, TypeError, ValueError) as err:
        raise UserError(
            f"could not read LoRA file {path.name} as safetensors ({err}); the file is "
            "corrupted, not safetensors, or holds bfloat16 (numpy has none): convert it to "
            "float16/float32 safetensors or download it again"
        ) from err
    if not tensors:
        raise UserError(f"LoRA file {path.name} holds no tensors; is it the right file?")
    return tensors, metadata


def read_adapter(path: Path, branch: dict[str, Any]) -> Adapter:
    """The factors of LoRA file `path` for a bundle whose manifest `lora_branch` is `branch`;
    refuses a file with a layer the bundle has no branch for, convolution (LoCon) or other
    adapter kinds, or a rank above the bundle's R."""
    path = check_lora_file(path)
    tensors, metadata = read_safetensors(path)
    _refuse_other_kinds(path, tensors)
    names = _layer_lookup(branch)
    shapes = {
        (component, r["name"]): (r["in"], r["out"])
        for component, records in branch["layers"].items()
        for r in records
    }
    config = _peft_configs(metadata)
    stems: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        stem, part = _split_key(key)
        if part is None:
            continue
        if stem not in names:
            raise UserError(
                f"LoRA file {path.name} adapts {stem!r}, which has no LoRA branch in this "
                "bundle; use a LoRA trained for this model (attention and feed-forward layers "
                "only), or fuse it into a U-Net bundle at export with --lora"
            )
        stems.setdefault(stem, {})[part] = value
    pairs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for stem, parts in stems.items():
        pairs.update(_unfuse(path, stem, parts, names[stem], shapes))
    if not pairs:
        raise UserError(f"LoRA file {path.name} holds no LoRA layers (no lora_A/lora_down keys)")
    layers: dict[str, dict[str, Factors]] = {}
    rank = 0
    for (component, name), parts in pairs.items():
        factors = _factors(path, component, name, parts, shapes[(component, name)], config)
        rank = max(rank, len(factors.down))
        layers.setdefault(component, {})[name] = factors
    if rank > branch["rank"]:
        raise UserError(
            f"LoRA file {path.name} has rank {rank}, above this bundle's LoRA rank "
            f"{branch['rank']}; re-export with --lora-rank {rank} or more"
        )
    size = sum(f.down.nbytes + f.up.nbytes for c in layers.values() for f in c.values())
    return Adapter(path.name, rank, layers, size)


def _refuse_other_kinds(path: Path, tensors: dict[str, np.ndarray]) -> None:
    for key, value in tensors.items():
        if any(kind in key for kind in OTHER_KINDS) or (key.endswith(DOWN) and value.ndim != 2):
            raise UserError(
                f"LoRA file {path.name} adapts convolution layers or is not a plain LoRA "
                f"(LoCon/LyCORIS: {key}); run-time adapters cover Linear layers only: fuse it "
                "into a bundle at export with --lora instead"
            )


def _layer_lookup(branch: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Every name a file may use for branch layers -> the (component, layer name) it feeds:
    diffusers/peft "<component>.<module path>" (a bare path for the U-Net), kohya's underscored
    form, and sd-scripts' fused Flux projections (several layers)."""
    lookup = {}
    for component, records in branch["layers"].items():
        module_prefix = TEXT_PREFIX if component.startswith("text_encoder") else ""
        kohya = [prefix for prefix, owner in KOHYA_PREFIXES.items() if owner == component]
        for record in records:
            name = record["name"]
            target = [(component, name)]
            module = f"{module_prefix}{name}"
            names = [f"{component}.{module}", f"{component}.{name}"]
            names += [f"{prefix}{module.replace('.', '_')}" for prefix in kohya]
            names += [name] if component == "unet" else []
            lookup.update(dict.fromkeys(names, target))
    return lookup | _kohya_flux_lookup(branch["layers"].get("transformer", []))


def _kohya_flux_lookup(records: list[dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """sd-scripts' Flux.1 names for the blocks a transformer's branch covers (a name is left
    out unless every layer it feeds has a branch)."""
    layers = {record["name"] for record in records}
    lookup = {}
    for kohya_block, (block, parts) in KOHYA_FLUX.items():
        pattern = re.compile(re.escape(block).replace(r"\{\}", r"(\d+)"))
        for index in sorted({m.group(1) for n in layers if (m := pattern.match(n))}):
            for part, fed in parts.items():
                targets = [f"{block.format(index)}{layer}" for layer in fed]
                if all(target in layers for target in targets):
                    lookup[f"{kohya_block.format(index)}{part}"] = [
                        ("transformer", target) for target in targets
                    ]
    return lookup


def _unfuse(
    path: Path,
    stem: str,
    parts: dict[str, np.ndarray],
    targets: list[tuple[str, str]],
    shapes: dict[tuple[str, str], tuple[int, int]],
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Each target layer's parts of file layer `stem`: the parts themselves for one target;
    for a fused projection, the shared down factor and alpha, and the up factor's rows of
    each target's outputs (exact: the fused update's rows are the targets' updates)."""
    up = parts.get("up")
    if len(targets) == 1 or up is None:  # a half layer: _factors says so
        return dict.fromkeys(targets, parts)
    outs = [shapes[target][1] for target in targets]
    if up.ndim != 2 or len(up) != sum(outs):
        raise UserError(
            f"LoRA file {path.name}: layer {stem} is not a fused projection of "
            f"{' + '.join(map(str, outs))} outputs in this bundle; use a LoRA for this model"
        )
    cuts = np.cumsum(outs)[:-1]
    return {
        target: {**parts, "up": rows}
        for target, rows in zip(targets, np.split(up, cuts), strict=True)
    }


def _split_key(key: str) -> tuple[str, str | None]:
    """(layer stem, "down" / "up" / "alpha") of a file key; part None for other keys."""
    for part, ends in (("down", DOWN), ("up", UP), ("alpha", (ALPHA,))):
        for end in ends:
            if key.endswith(end):
                return key[: -len(end)], part
    return key, None


def _peft_configs(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per component, the peft LoraConfig fields diffusers saved in the file's metadata."""
    raw = metadata.get(ADAPTER_METADATA)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _factors(
    path: Path,
    component: str,
    name: str,
    parts: dict[str, np.ndarray],
    shape: tuple[int, int],
    config: dict[str, dict[str, Any]],
) -> Factors:
    if "down" not in parts or "up" not in parts:
        raise UserError(f"LoRA file {path.name} has only half of layer {name} (down and up)")
    # float32 files are used as read: no copy here, the pool's bank is the only one
    down = parts["down"].astype(np.float32, copy=False)
    up = parts["up"].astype(np.float32, copy=False)
    fan_in, fan_out = shape
    rank = len(down)
    if down.shape != (rank, fan_in) or up.shape != (fan_out, rank):
        raise UserError(
            f"LoRA file {path.name}: layer {name} has factors {down.shape} and {up.shape}, "
            f"this bundle's layer is {fan_in} -> {fan_out}; use a LoRA for this model"
        )
    factor = _alpha_over_rank(parts, rank, name, config.get(component, {}))
    if not (_finite(down) and _finite(up) and math.isfinite(factor)):
        raise UserError(f"LoRA file {path.name}: layer {name} holds NaN or infinity; it is broken")
    return Factors(down, up, factor)


def _finite(values: np.ndarray) -> bool:
    """No NaN or infinity in `values`: min and max carry either (NaN propagates), with no
    temporary array as large as `values`."""
    return not values.size or (math.isfinite(values.min()) and math.isfinite(values.max()))


def _alpha_over_rank(
    parts: dict[str, np.ndarray], rank: int, name: str, config: dict[str, Any]
) -> float:
    """kohya and converted files keep alpha per layer; peft in its config (alpha_pattern for
    exceptions, rsLoRA divides by sqrt(rank)); without either, alpha = rank."""
    if "alpha" in parts:
        return float(parts["alpha"]) / rank
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if name.endswith(pattern):
            alpha = value
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
