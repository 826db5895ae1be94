"""The declared schema of manifest.json: every key's type, range and allowed values, and the
inputs and outputs each component's role requires.

`problems` returns one line per violation, so a hand-edited or hostile manifest is refused at
load with every fault listed, instead of a traceback or a NaN image at the first call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from .schedulers import SCHEDULERS

# Version 2 added the diffusion-transformer families (sd3, flux); U-Net bundles are still
# written as version 1, so an older sdrt keeps reading them and refuses only what it cannot run.
SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, 2)
# the families each schema version may declare
FAMILIES = {1: ("sd1", "sd2", "sdxl"), 2: ("sd1", "sd2", "sdxl", "sd3", "flux")}
COMPONENTS = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "unet",
    "transformer",
    "vae_decoder",
    "vae_encoder",
)
REQUIRED_COMPONENTS = ("text_encoder", "vae_decoder")
DENOISERS = ("unet", "transformer")  # exactly one of them
# what the runtime feeds each component and reads back from it
ROLE_INPUTS = {
    "text_encoder": {"input_ids"},
    "text_encoder_2": {"input_ids"},
    "text_encoder_3": {"input_ids"},
    "unet": {"sample", "timestep", "encoder_hidden_states"},
    "transformer": {"sample", "timestep", "encoder_hidden_states", "pooled_projections"},
    "vae_decoder": {"latent"},
    "vae_encoder": {"image"},
}
ROLE_OUTPUTS = {
    "text_encoder": {"text_embeddings"},
    "text_encoder_2": {"text_embeddings"},
    "text_encoder_3": {"text_embeddings"},
    "unet": {"noise_pred"},
    "transformer": {"noise_pred"},
    "vae_decoder": {"image"},
    "vae_encoder": {"latent_moments"},
}
SHA256 = re.compile(r"[0-9a-f]{64}")

Check = Callable[[Any], str | None]  # None when the value is fine, else what is wrong


def _integer(low: int, high: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        if value < low or (high is not None and value > high):
            return f"must be in [{low}, {high if high is not None else 'inf'}], got {value}"
        return None

    return check


def _number(positive: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not math.isfinite(value) or (positive and value <= 0):
            return f"must be a finite {'positive ' if positive else ''}number, got {value!r}"
        return None

    return check


def _one_of(*allowed: Any) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, (str, bool)) and value in allowed and type(value) is type(allowed[0])
        return None if ok else f"must be one of {', '.join(map(repr, allowed))}, got {value!r}"

    return check


def _of_type(kind: type, what: str) -> Check:
    return lambda value: None if isinstance(value, kind) else f"must be {what}, got {value!r}"


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _size(value: Any) -> str | None:
    bad = not isinstance(value, list) or len(value) != 2 or any(_integer(8)(v) for v in value)
    return f"must be [height, width] in pixels, got {value!r}" if bad else None


def _file_name(value: Any) -> str | None:
    if not isinstance(value, str) or not value or "\0" in value:
        return f"must be a file name inside the bundle, got {value!r}"
    return None


def _parity(value: Any) -> str | None:
    ok = isinstance(value, dict) and all(
        _number()(value.get(key)) is None for key in ("max_abs", "max_rel")
    )
    return None if ok else f"must be an object with numbers max_abs and max_rel, got {value!r}"


def _sha256(value: Any) -> str | None:
    ok = isinstance(value, str) and SHA256.fullmatch(value)
    return None if ok else f"must be 64 lowercase hex digits, got {value!r}"


TOP_LEVEL: dict[str, tuple[bool, Check]] = {  # key -> (required, check)
    "schema_version": (True, _integer(min(SCHEMA_VERSIONS), SCHEMA_VERSION)),
    "family": (True, _one_of(*FAMILIES[SCHEMA_VERSION])),
    # "flow": the denoiser predicts the velocity of a flow-matching path (sd3, flux)
    "prediction_type": (True, _one_of("epsilon", "v_prediction", "sample", "flow")),
    "latent_channels": (True, _integer(1, 64)),
    "unet_in_channels": (False, _integer(1, 128)),
    "denoiser_in_channels": (False, _integer(1, 256)),
    "t5_max_length": (False, _integer(1, 4096)),
    "patch_size": (False, _integer(1, 16)),
    "vae_scale_factor": (True, _integer(1, 64)),
    "vae_scaling_factor": (True, _number(positive=True)),
    "vae_shift_factor": (False, _optional(_number())),
    "text_max_length": (True, _integer(1, 4096)),
    "default_size": (True, _size),
    "size_multiple": (False, _integer(1, 1024)),
    "scheduler": (True, _one_of(*SCHEDULERS)),
    "scheduler_config": (True, _of_type(dict, "an object")),
    "components": (True, _of_type(dict, "an object of components")),
    "tokenizer_files": (True, _of_type(dict, "an object: tokenizer folder -> file -> sha256")),
    "fused_attention": (False, _of_type(bool, "true or false")),
    "cuda_fusions": (False, _of_type(bool, "true or false")),
    "zero_negative_prompt": (False, _of_type(bool, "true or false")),
    "loras": (False, _of_type(list, "a list")),
    "lora_branch": (False, _of_type(dict, "an object: rank and layers per component")),
    "export": (False, _of_type(dict, "an object")),
}
COMPONENT: dict[str, tuple[bool, Check]] = {
    "file": (True, _file_name),
    "external_data": (False, _optional(_file_name)),
    "sha256": (True, _sha256),
    "precision": (True, _one_of("fp32", "fp16", "bf16")),
    "inputs": (True, _of_type(list, "a list of tensors")),
    "outputs": (True, _of_type(list, "a list of tensors")),
    "cuda_only_ops": (False, _optional(_of_type(dict, "an object"))),
    "static_variants": (False, _of_type(list, "a list")),
    "parity": (False, _parity),
}
VARIANT: dict[str, tuple[bool, Check]] = {
    "file": (True, _file_name),
    "external_data": (False, _optional(_file_name)),
    "sha256": (True, _sha256),
    "shares_external_data": (False, _of_type(bool, "true or false")),
    "dims": (True, _of_type(dict, "an object of dimension sizes")),
}


def problems(manifest: Any) -> list[str]:
    """Every way `manifest` breaks the schema, one line each; empty when it is valid."""
    if not isinstance(manifest, dict):
        return ["does not hold a JSON object"]
    found = _fields(manifest, TOP_LEVEL, "")
    version, family = manifest.get("schema_version"), manifest.get("family")
    if version in FAMILIES and family not in FAMILIES[version]:
        found.append(f"family {family!r} needs schema version {SCHEMA_VERSION}, not {version}")
    components = manifest.get("components")
    if isinstance(components, dict):
        found += [f"lists no {c} component" for c in REQUIRED_COMPONENTS if c not in components]
        if sum(d in components for d in DENOISERS) != 1:
            found.append(f"must list exactly one denoiser component ({' or '.join(DENOISERS)})")
        for name, entry in components.items():
            found += _component(name, entry)
    tokenizers = manifest.get("tokenizer_files")
    if isinstance(tokenizers, dict):
        for folder, files in tokenizers.items():
            if not isinstance(files, dict) or not files:
                found.append(f"tokenizer_files.{folder} must map file names to sha256 digests")
                continue
            for file, digest in files.items():
                found += _prefixed(f"tokenizer_files.{folder}.{file}", _sha256(digest))
    return found


def _component(name: str, entry: Any) -> list[str]:
    where = f"components.{name}"
    if name not in COMPONENTS:
        return [f"{where}: unknown component; expected one of {', '.join(COMPONENTS)}"]
    if not isinstance(entry, dict):
        return [f"{where} must be an object, got {entry!r}"]
    found = _fields(entry, COMPONENT, f"{where}.")
    for key, required in (("inputs", ROLE_INPUTS[name]), ("outputs", ROLE_OUTPUTS[name])):
        tensors = entry.get(key)
        if isinstance(tensors, list):
            found += _tensors(f"{where}.{key}", tensors, required)
    for i, variant in enumerate(entry.get("static_variants") or []):
        if not isinstance(variant, dict):
            found.append(f"{where}.static_variants[{i}] must be an object, got {variant!r}")
            continue
        found += _fields(variant, VARIANT, f"{where}.static_variants[{i}].")
        dims = variant.get("dims")
        if isinstance(dims, dict) and any(_integer(1)(v) for v in dims.values()):
            found.append(f"{where}.static_variants[{i}].dims must map names to integers >= 1")
    return found


def _tensors(where: str, tensors: list[Any], required: set[str]) -> list[str]:
    found, names = [], set()
    for i, spec in enumerate(tensors):
        ok = (
            isinstance(spec, dict)
            and isinstance(spec.get("name"), str)
            and isinstance(spec.get("dtype"), str)
            and isinstance(spec.get("shape"), list)
            and all(isinstance(d, str) or not _integer(1)(d) for d in spec["shape"])
        )
        if not ok:
            found.append(f"{where}[{i}] must be {{name, dtype, shape}}, got {spec!r}")
        else:
            names.add(spec["name"])
    missing = sorted(required - names)
    if missing and not found:
        found.append(f"{where} lacks {', '.join(missing)}, which this component's role needs")
    return found


def _fields(entry: dict[str, Any], schema: dict[str, tuple[bool, Check]], where: str) -> list[str]:
    found = []
    for key, (required, check) in schema.items():
        if key not in entry:
            found += [f"{where}{key} is missing"] if required else []
        else:
            found += _prefixed(f"{where}{key}", check(entry[key]))
    return found


def _prefixed(where: str, problem: str | None) -> list[str]:
    return [] if problem is None else [f"{where} {problem}"]
