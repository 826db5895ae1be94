"""Bake LoRA files into a pipeline's weights at export time, so engines and the runtime never see
a LoRA: each file becomes plain weights W + scale * (alpha / rank) * up @ down.

diffusers reads both diffusers/peft and kohya ("lora_unet_...", "lora_te_...") naming, fuses at
the requested scale, and drops the adapter layers again; this module adds the checks a user can
act on and the records the manifest keeps.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sdrt.bundle import file_sha256
from sdrt.errors import UserError
from sdrt.lora_files import check_lora_file, check_scale, parse_lora_arg

__all__ = ["apply_loras", "check_lora_file", "check_scale", "parse_lora_arg"]
# The pipeline components a Stable Diffusion LoRA may adapt, as diffusers names them.
LORA_COMPONENTS = ("unet", "text_encoder")


def apply_loras(pipe: Any, loras: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """Fuse each (path, scale) into `pipe`, in order, and return one manifest record per LoRA.

    Every path, scale and file header is checked before the first fuse, so a typo fails with
    the weights untouched; a file that then does not fit the model may leave earlier LoRAs
    fused, so a caller discards the pipeline on error.
    """
    if not loras:
        return []
    if importlib.util.find_spec("peft") is None:
        raise UserError("applying LoRAs needs the peft package; install it with: pip install peft")
    files = [check_lora_file(path) for path, _ in loras]
    scales = [check_scale(scale, str(path)) for path, scale in loras]
    keys = [lora_keys(path) for path in files]
    return [
        _fuse_one(pipe, path, scale, path_keys, adapter_name=f"sdrt_lora_{index}")
        for index, (path, scale, path_keys) in enumerate(zip(files, scales, keys, strict=True))
    ]


def lora_keys(path: Path) -> list[str]:
    """The tensor names in a LoRA file, read from its header without loading the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"could not read LoRA file {path.name} as safetensors ({err}); the file is "
            "corrupted or not really safetensors: download or convert it again"
        ) from err
    if not keys:
        raise UserError(f"LoRA file {path.name} holds no tensors; is it the right file?")
    return keys


def count_lora_layers(keys: list[str]) -> int:
    """How many layers a LoRA file adapts: one down (A) matrix per layer, in every naming.

    peft names it lora_A.weight; kohya lora_down.weight; older diffusers lora.down.weight,
    to_q_lora.down.weight or lora_linear_layer.down.weight.
    """
    return sum(1 for k in keys if "lora" in k and k.endswith((".lora_A.weight", "down.weight")))


def adapted_layers(pipe: Any, adapter_name: str) -> dict[str, int]:
    """Per component, how many of its layers carry `adapter_name`; components with none omitted."""
    from peft.tuners.lora import LoraLayer

    counts = {}
    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        count = sum(
            1
            for module in model.modules()
            if isinstance(module, LoraLayer)
            and (adapter_name in module.lora_A or adapter_name in module.lora_embedding_A)
        )
        if count:
            counts[component] = count
    return counts


def _fuse_one(
    pipe: Any, path: Path, scale: float, keys: list[str], adapter_name: str
) -> dict[str, Any]:
    try:
        _load_adapter(pipe, path, adapter_name)
        touched = _check_every_layer_placed(pipe, path, keys, adapter_name)
        _fuse_adapter(pipe, path, scale, adapter_name)
    finally:
        # After a fuse the fused weights stay; otherwise this drops a half-loaded adapter.
        pipe.unload_lora_weights()
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "scale": scale,
        "keys": len(keys),
        "layers": touched,
    }


def _load_adapter(pipe: Any, path: Path, adapter_name: str) -> None:
    from peft.utils.error import NoMatchingPeftModuleError

    try:
        # A file path (not a loaded dict) so diffusers also reads the alpha that peft-trained
        # files keep in the safetensors metadata.
        pipe.load_lora_weights(
            str(path), adapter_name=adapter_name, use_safetensors=True, local_files_only=True
        )
    except NoMatchingPeftModuleError as err:
        raise _no_match(path) from err
    except (ValueError, RuntimeError, KeyError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"LoRA file {path.name} does not fit this model ({detail}); "
            "use a LoRA trained for this model family"
        ) from err


def _check_every_layer_placed(
    pipe: Any, path: Path, keys: list[str], adapter_name: str
) -> dict[str, int]:
    """The adapted layers per component; diffusers skips layers it cannot place without an
    error, and a half-applied LoRA would be baked into the bundle unnoticed."""
    touched = adapted_layers(pipe, adapter_name)
    applied, in_file = sum(touched.values()), count_lora_layers(keys)
    if applied == 0:
        raise _no_match(path)
    if applied < in_file:
        raise UserError(
            f"only {applied} of the {in_file} layers in LoRA file {path.name} match this "
            "model; use a LoRA trained for this model family"
        )
    return touched


def _fuse_adapter(pipe: Any, path: Path, scale: float, adapter_name: str) -> None:
    try:
        pipe.fuse_lora(
            components=list(LORA_COMPONENTS),
            lora_scale=scale,
            safe_fusing=True,
            adapter_names=[adapter_name],
        )
    except ValueError as err:  # safe_fusing found NaN in the fused weights
        raise UserError(
            f"fusing LoRA file {path.name} at scale {scale} gives NaN weights; the file is broken"
        ) from err


def _no_match(path: Path) -> UserError:
    return UserError(
        f"no key in LoRA file {path.name} matches a layer of this model's U-Net or text encoder; "
        "use a LoRA trained for this model family"
    )
