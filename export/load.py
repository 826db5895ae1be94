"""Load a Stable Diffusion checkpoint for export: a diffusers folder, a single .safetensors
file, or a random-weight build of a published architecture.

Weights load through safetensors; pickle checkpoints run arbitrary code when unpickled, so they
are refused unless the caller opts in.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from sdrt.errors import UserError

from .checkpoint_files import check_pickle_checkpoint, safetensors_header
from .families import PIPELINE_CLASSES, export_family
from .memory_estimate import source_component_bytes
from .presets import PRESETS

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# A pipeline of a family that can stream (`STREAMED` in export/families) with more fp32
# weight than this is exported with its weights left on disk (lazy_weights, streamed_export).
LAZY_BYTES = 8 * 2**30


@contextmanager
def opened_pipeline(
    source: str | None,
    random_weights: str | None = None,
    allow_pickle: bool = False,
    lazy: bool | None = None,
    progress: bool = True,
) -> Iterator[Any]:
    """The pipeline to export, as `load_pipeline` loads it, except a big diffusion transformer
    (`streams`, or `lazy` True): its weights stay in their safetensors files, read a layer at
    a time. A random-weight preset that big is first written as a diffusers folder, shard by
    shard, in a temporary directory removed afterwards."""
    lazy = streams(source, random_weights) if lazy is None else lazy
    if random_weights is not None and lazy:
        from .random_folder import write_random_folder

        with tempfile.TemporaryDirectory(prefix="sdrt-random-") as tmp:
            write_random_folder(random_weights, Path(tmp), progress=progress)
            yield lazy_pipeline(Path(tmp), temporary=True)
    elif lazy:
        yield lazy_pipeline(checked_source(source, allow_pickle))
    else:
        yield load_pipeline(source, random_weights, allow_pickle)


def streams(source: str | None, random_weights: str | None) -> bool:
    """Whether export keeps this model's weights on disk: a family that can stream (`STREAMED`
    in export/families) with more than LAZY_BYTES of fp32 weights, a preset's counted on
    modules built without memory, a folder's from its safetensors headers."""
    family = source_family(source, random_weights)
    if family is None or not getattr(family, "STREAMED", False):
        return False
    return sum(source_component_bytes(source, random_weights).values()) > LAZY_BYTES


def lazy_pipeline(path: Path, temporary: bool = False) -> Any:
    """A diffusers folder's pipeline with every model's parameters on the meta device, bound
    to the safetensors tensors they are read from (`lazy_weights`); tokenizers and the
    scheduler load as usual. `temporary`: export's own folder, whose weight files export
    deletes as soon as it no longer needs them."""
    import diffusers
    import transformers

    from .lazy_weights import WeightSource, bound_parameters, empty_weights

    class_name = _pipeline_class(path)
    index = json.loads((path / "model_index.json").read_text())
    parts: dict[str, Any] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library = {"diffusers": diffusers, "transformers": transformers}.get(entry[0])
        if library is None:
            raise UserError(f"{path / name}: sdrt cannot load a {entry[0]} component")
        cls = getattr(library, entry[1])
        folder = path / name
        if hasattr(cls, "load_config") and hasattr(cls, "from_config") and entry[0] == "diffusers" \
                and not name.startswith("scheduler"):  # fmt: skip
            with empty_weights():
                parts[name] = cls.from_config(cls.load_config(folder))
        elif entry[0] == "transformers" and name.startswith("text_encoder"):
            with empty_weights():
                parts[name] = cls(cls.config_class.from_pretrained(folder))
        else:
            parts[name] = cls.from_pretrained(folder)
            continue
        parts[name].eval()
        bound_parameters(parts[name], WeightSource.of_folder(folder, temporary))
    return getattr(diffusers, class_name)(**parts)


def load_pipeline(
    source: str | None,
    random_weights: str | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
) -> Any:
    """A diffusers StableDiffusionPipeline in float32 on the CPU, ready to trace."""
    if random_weights is not None:
        return random_pipeline(random_weights, seed=seed)
    path = checked_source(source, allow_pickle)
    if path.is_dir():
        return _load_folder(path, allow_pickle)
    return _load_single_file(path)


def checked_source(source: str | None, allow_pickle: bool) -> Path:
    """The model path, refused in one line unless it is a folder, a .safetensors file whose
    header holds together, or (with `allow_pickle`) a pickle checkpoint: checked from the
    file's first bytes, before anything is sized from its numbers."""
    if source is None:
        raise UserError(
            "no model given: pass a diffusers folder or .safetensors file, "
            "or --random-weights tiny|sd15|sd21|sdxl"
        )
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"model {source!r} does not exist; pass a diffusers folder or a .safetensors file"
        )
    if path.is_dir():
        return path
    if path.suffix == ".safetensors":
        safetensors_header(path)
        return path
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{path.name} is a pickle checkpoint, which can run arbitrary code "
                "when loaded; convert it to .safetensors or pass --allow-pickle"
            )
        check_pickle_checkpoint(path)
        return path
    raise UserError(f"{path.name} is neither a diffusers folder nor a .safetensors file")


def source_family(source: str | None, random_weights: str | None) -> ModuleType | None:
    """The export family of what `load_pipeline` would load, read without loading it (a
    preset's, or a folder's model_index.json class); None where that cannot be told."""
    if random_weights is not None:
        return (
            export_family(PRESETS[random_weights]["family"]) if random_weights in PRESETS else None
        )
    path = Path(source or "")
    if not (path / "model_index.json").is_file():
        return None  # a single file, or a mistake load_pipeline names
    return PIPELINE_CLASSES[_pipeline_class(path)]


def _pipeline_class(path: Path) -> str:
    """A diffusers folder's pipeline class, refused unless sdrt exports it."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot read {path / 'model_index.json'} ({err}); fix or re-save it"
        ) from err
    class_name = index.get("_class_name", "") if isinstance(index, dict) else ""
    if class_name not in PIPELINE_CLASSES:
        raise UserError(
            f"{path} holds a {class_name or 'unknown'} model; sdrt exports "
            f"{', '.join(PIPELINE_CLASSES)}"
        )
    return class_name


def _load_folder(path: Path, allow_pickle: bool) -> Any:
    import diffusers

    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} has no model_index.json; is it a diffusers model folder?")
    pickled = [
        folder.name
        for folder in sorted(path.iterdir())
        if folder.is_dir()
        and not list(folder.glob("*.safetensors"))
        and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir())
    ]
    if pickled and not allow_pickle:
        raise UserError(
            f"{path} holds pickle weights without a safetensors copy "
            f"({', '.join(pickled)}), which can run arbitrary code when loaded; "
            "convert them to safetensors or pass --allow-pickle"
        )
    class_name = _pipeline_class(path)
    extra = PIPELINE_CLASSES[class_name].load_options(class_name)
    return getattr(diffusers, class_name).from_pretrained(
        path,
        **extra,
        use_safetensors=None if pickled else True,
    )


def _load_single_file(path: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), safety_checker=None, requires_safety_checker=False
        )
    except OSError as err:  # diffusers fetches the architecture config from the Hub
        reason = " ".join(str(err).split())  # diffusers' Hub errors span several lines
        raise UserError(
            f"could not read {path.name} as a single-file checkpoint ({reason}); "
            "convert it to a diffusers folder first"
        ) from err


def random_pipeline(preset: str, seed: int = 0, device: str = "cpu") -> Any:
    """The preset's architecture with seeded random weights and small built-in vocabularies.

    device="meta" builds the modules without memory, to check a preset's shapes cheaply.
    """
    import diffusers
    import torch

    if preset not in PRESETS:
        raise UserError(
            f"unknown random-weight preset {preset!r}; choose one of {', '.join(PRESETS)}"
        )
    spec = PRESETS[preset]
    scheduler = getattr(diffusers, spec["scheduler"]["_class_name"]).from_config(spec["scheduler"])
    torch.manual_seed(seed)
    with torch.device(device):
        pipe = export_family(spec["family"]).random_pipeline(spec, scheduler)
    for module in pipe.components.values():  # as from_pretrained leaves them: T5 has dropout
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def family_of(pipe: Any) -> str:
    """The export family of a loaded diffusers pipeline (sd1, sd2, sdxl, sd3, flux)."""
    return PIPELINE_CLASSES[type(pipe).__name__].family_of(pipe)
