"""Where compiled engines live in a bundle, what they were built for, and when one may be used.

Engines sit under `BUNDLE/engines/<key>/<component>.engine` beside an `engine.json` that records
everything the key encodes: backend and its version, GPU name and compute capability, precision,
the shape profile of every input and the sha256 of the ONNX each engine came from. An engine
whose record disagrees with this machine or this bundle is refused with the field that differs;
it is never used silently. Everything here is pure (the facts about the machine come in as an
`Environment`), so it is tested without a GPU; TensorRT itself is only touched by the builder
(`sdrt.export.tensorrt_build`) and the backend (`sdrt.backends.tensorrt`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic_files import staging_dir
from .atomic_files import write_atomic as write_atomic  # engines are written through it
from .errors import UserError

ENGINES_DIR = "engines"
RECORD = "engine.json"
RECORD_VERSION = 1
ENGINE_SUFFIX = ".engine"
GUIDANCE_MODES = ("cfg", "none", "both")

Shape = tuple[int, ...]
Span = tuple[int, int, int]  # (min, opt, max) of one size


@dataclass(frozen=True)
class ShapeRange:
    """One input's optimization-profile shapes."""

    min: Shape
    opt: Shape
    max: Shape


Profile = dict[str, ShapeRange]  # input name -> shapes


@dataclass(frozen=True)
class Environment:
    """Facts about this machine that an engine is only valid for."""

    backend: str  # "tensorrt" or "tensorrt-rtx"
    version: str  # the library version that builds and runs the engine
    gpu_name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class SizeRanges:
    """The user's request, in images and pixels; each span is (min, opt, max).

    guidance: "cfg" doubles the U-Net batch (negative + positive conditioning), "none" does
    not, "both" covers both (min from the plain batch, opt and max doubled). Text encoders
    always cover the plain batch up to the U-Net's maximum.
    """

    batch: Span
    height: Span
    width: Span
    guidance: str = "cfg"


@dataclass(frozen=True)
class ComponentSpec:
    precision: str  # "fp16", "fp32" or "bf16"
    onnx_sha256: str
    profile: Profile


@dataclass(frozen=True)
class EngineSpec:
    """Everything a set of engines is built from and for; all of it goes into the key."""

    environment: Environment
    sizes: SizeRanges
    components: dict[str, ComponentSpec]
    builder: dict[str, Any]  # optimization level, workspace: not validity, but worth a rebuild


@dataclass(frozen=True)
class EngineEntry:
    """A committed engines/<key> directory and what its engine.json says."""

    directory: Path
    spec: EngineSpec
    sizes_on_disk: dict[str, int]  # component -> engine file size in bytes
    created: str
    fp16_sources: dict[str, str]  # component -> where its fp16 types came from (fp16 engines)

    def engine_path(self, component: str) -> Path:
        return self.directory / f"{component}{ENGINE_SUFFIX}"


# ---- keys ---------------------------------------------------------------------------------


def spec_to_json(spec: EngineSpec) -> dict[str, Any]:
    return {
        "environment": asdict(spec.environment),
        "sizes": {
            "batch": list(spec.sizes.batch),
            "height": list(spec.sizes.height),
            "width": list(spec.sizes.width),
            "guidance": spec.sizes.guidance,
        },
        "components": {
            name: {
                "precision": c.precision,
                "onnx_sha256": c.onnx_sha256,
                "profile": {
                    tensor: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
                    for tensor, r in sorted(c.profile.items())
                },
            }
            for name, c in sorted(spec.components.items())
        },
        "builder": dict(sorted(spec.builder.items())),
    }


def spec_from_json(data: Any) -> EngineSpec:
    """Parse the spec part of an engine.json; KeyError/TypeError/ValueError when malformed."""
    env = data["environment"]
    sizes = data["sizes"]
    return EngineSpec(
        environment=Environment(
            backend=str(env["backend"]),
            version=str(env["version"]),
            gpu_name=str(env["gpu_name"]),
            compute_capability=str(env["compute_capability"]),
        ),
        sizes=SizeRanges(
            batch=_span(sizes["batch"]),
            height=_span(sizes["height"]),
            width=_span(sizes["width"]),
            guidance=str(sizes["guidance"]),
        ),
        components={
            str(name): ComponentSpec(
                precision=str(c["precision"]),
                onnx_sha256=str(c["onnx_sha256"]),
                profile={
                    str(tensor): ShapeRange(_shape(r["min"]), _shape(r["opt"]), _shape(r["max"]))
                    for tensor, r in c["profile"].items()
                },
            )
            for name, c in data["components"].items()
        },
        builder=dict(data["builder"]),
    )


def _span(value: Any) -> Span:
    low, opt, high = (int(v) for v in value)
    return (low, opt, high)


def _shape(value: Any) -> Shape:
    return tuple(int(v) for v in value)


def cache_key(spec: EngineSpec) -> str:
    """A directory name people can read, ending in a hash over the whole spec.

    The readable part names backend, version, compute capability, precision and sizes; the
    hash also covers GPU name, every tensor's profile, the ONNX hashes and builder options.
    """
    env = spec.environment
    precisions = sorted({c.precision for c in spec.components.values()})
    sizes = spec.sizes
    if sizes.height[0] == sizes.height[2] and sizes.width[0] == sizes.width[2]:
        size_tag = f"{sizes.height[0]}x{sizes.width[0]}"
    else:
        size_tag = f"{sizes.height[0]}x{sizes.width[0]}-{sizes.height[2]}x{sizes.width[2]}"
    batch = sizes.batch
    batch_tag = f"b{batch[0]}" if batch[0] == batch[2] else f"b{batch[0]}-{batch[2]}"
    readable = "-".join(
        [environment_tag(env), "+".join(precisions) or "none", batch_tag, size_tag, sizes.guidance]
    )
    canonical = json.dumps(spec_to_json(spec), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    return f"{_slug(readable)}-{digest}"


def environment_tag(env: Environment) -> str:
    """backend-version-smXY: what a timing cache or an engine is tied to, as a file name."""
    capability = "sm" + env.compute_capability.replace(".", "")
    return _slug(f"{env.backend}-{env.version}-{capability}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")


def engine_dir(bundle_root: Path, spec: EngineSpec) -> Path:
    return bundle_root / ENGINES_DIR / cache_key(spec)


# ---- records ------------------------------------------------------------------------------


def record_json(
    spec: EngineSpec, sizes_on_disk: Mapping[str, int], fp16_sources: Mapping[str, str]
) -> dict[str, Any]:
    """The engine.json written beside the engines: the spec, and per file what the build made
    (its size, and for fp16 engines where the fp16 types came from)."""
    return {
        "record_version": RECORD_VERSION,
        "key": cache_key(spec),
        **spec_to_json(spec),
        "files": {
            name: {
                "file": f"{name}{ENGINE_SUFFIX}",
                "bytes": n,
                **({"fp16_source": fp16_sources[name]} if name in fp16_sources else {}),
            }
            for name, n in sorted(sizes_on_disk.items())
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def read_entry(directory: Path) -> EngineEntry:
    """Read engines/<key>/engine.json; UserError naming the problem when it cannot be trusted."""
    path = directory / RECORD
    try:
        data = json.loads(path.read_text())
        if data.get("record_version") != RECORD_VERSION:
            raise ValueError(f"record version {data.get('record_version')!r}")
        spec = spec_from_json(data)
        sizes = {str(name): int(f["bytes"]) for name, f in data["files"].items()}
        fp16_sources = {
            str(name): str(f["fp16_source"])
            for name, f in data["files"].items()
            if "fp16_source" in f
        }
        created = str(data.get("created", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(
            f"{path} is unreadable ({err}); delete {directory} and run `sdrt build` again"
        ) from err
    if cache_key(spec) != directory.name:
        raise UserError(
            f"{path} does not describe the engines of {directory.name} (edited or copied by "
            f"hand); delete {directory} and run `sdrt build` again"
        )
    return EngineEntry(directory, spec, sizes, created, fp16_sources)


def entry_problems(entry: EngineEntry) -> list[str]:
    """Engine files that are missing or not the size recorded (an interrupted copy)."""
    problems = []
    for name, size in entry.sizes_on_disk.items():
        path = entry.engine_path(name)
        if not path.is_file():
            problems.append(f"{path.name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path.name} has {path.stat().st_size} bytes, {size} recorded")
    return problems


def mismatches(
    spec: EngineSpec, env: Environment, onnx_sha256: Mapping[str, str], component: str
) -> list[str]:
    """Each field that makes `spec`'s engine for `component` invalid here, in words."""
    labels = (
        ("backend", "backend"),
        ("version", "TensorRT version"),
        ("gpu_name", "GPU"),
        ("compute_capability", "compute capability"),
    )
    reasons = [
        f"{label}: built for {getattr(spec.environment, field)!r}, "
        f"this machine has {getattr(env, field)!r}"
        for field, label in labels
        if getattr(spec.environment, field) != getattr(env, field)
    ]
    built = spec.components.get(component)
    if built is None:
        reasons.append(f"component: it holds no {component} engine")
    elif built.onnx_sha256 != onnx_sha256.get(component):
        reasons.append(
            f"ONNX sha256 of {component}: built from {built.onnx_sha256[:12]}, the bundle now "
            f"has {str(onnx_sha256.get(component))[:12]} (the ONNX was re-exported)"
        )
    return reasons


def usable_entries(
    engines_root: Path, component: str, env: Environment, onnx_sha256: Mapping[str, str]
) -> list[EngineEntry]:
    """Entries with an engine for `component` that is valid on this machine, newest first.

    Entries for other GPUs are fine to keep beside ours and are skipped; but when none fits,
    the error names what differs in each, so a stale engine is never mistaken for a missing one.
    """
    build_hint = f"run `sdrt build {engines_root.parent}` on this machine"
    directories = (
        sorted(p for p in engines_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if engines_root.is_dir()
        else []
    )
    usable: list[EngineEntry] = []
    refused: list[str] = []
    for directory in directories:
        if not (directory / RECORD).is_file():
            continue
        try:
            entry = read_entry(directory)
        except UserError as err:
            refused.append(f"{directory.name}: {err}")
            continue
        if component not in entry.spec.components:
            continue
        reasons = mismatches(entry.spec, env, onnx_sha256, component) + entry_problems(entry)
        if reasons:
            refused.append(f"{directory.name}: {'; '.join(reasons)}")
        else:
            usable.append(entry)
    if usable:
        return sorted(usable, key=lambda e: e.created, reverse=True)
    if refused:
        raise UserError(
            f"no {env.backend} engine for {component} in {engines_root} can be used here: "
            + " | ".join(refused)
            + f"; {build_hint}"
        )
    raise UserError(f"no {env.backend} engine for {component} in {engines_root}; {build_hint}")


# ---- shapes -------------------------------------------------------------------------------


def profile_violation(shapes: Mapping[str, Sequence[int]], profile: Profile) -> str | None:
    """Why these input shapes fall outside `profile`, or None when every input is inside."""
    for name, allowed in profile.items():
        if name not in shapes:
            return f"input {name!r} is missing"
        shape = tuple(shapes[name])
        if len(shape) != len(allowed.min):
            return f"{name!r} has {len(shape)} dimensions, the engine takes {len(allowed.min)}"
        for axis, (size, low, high) in enumerate(zip(shape, allowed.min, allowed.max, strict=True)):
            if not low <= size <= high:
                return (
                    f"{name!r} has shape {shape}; dimension {axis} is {size}, outside "
                    f"{low}..{high} (engine accepts {format_range(allowed)})"
                )
    return None


def format_range(shapes: ShapeRange) -> str:
    """(2..8, 4, 32..128, 32..128): fixed dims once, ranges as low..high."""
    parts = [
        str(lo) if lo == hi else f"{lo}..{hi}"
        for lo, hi in zip(shapes.min, shapes.max, strict=True)
    ]
    return f"({', '.join(parts)})"


def select_entry(
    entries: Sequence[EngineEntry], component: str, shapes: Mapping[str, Sequence[int]]
) -> EngineEntry:
    """The first entry whose profile for `component` covers `shapes`; UserError if none does."""
    reasons = []
    for entry in entries:
        violation = profile_violation(shapes, entry.spec.components[component].profile)
        if violation is None:
            return entry
        reasons.append(f"{entry.directory.name}: {violation}")
    raise UserError(
        f"no built {component} engine accepts this request ({' | '.join(reasons)}); run "
        "`sdrt build` with a batch/height/width range that covers it (and guidance mode "
        "'both' or 'none' for runs without classifier-free guidance)"
    )


# ---- atomic writes ------------------------------------------------------------------------


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a hidden sibling of `final` to fill; it becomes `final` only if the block succeeds.

    On any exception (a failed build, Ctrl-C) the staging directory is removed, so no
    engines/<key> directory exists that a later run could trust.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(final)  # also removes what a killed build left for this key
    try:
        yield staging
        _replace_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(source: Path, final: Path) -> None:
    """Rename `source` onto `final`; an old `final` is moved aside first (rename needs a free
    name) and deleted after."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(source, final)
    shutil.rmtree(old, ignore_errors=True)
