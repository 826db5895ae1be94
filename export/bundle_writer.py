"""Write a complete bundle: ONNX graphs, tokenizer, scheduler config and manifest.json.

Everything is written into a hidden sibling directory that is renamed into place only when the
last check has passed, so an interrupted or failed export never leaves a bundle a later run
would trust.
"""

from __future__ import annotations

import datetime
import errno
import gc
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm import tqdm

from sdrt.atomic_files import clear_staging, disk_full, staging_dir, write_atomic
from sdrt.bundle import MANIFEST, file_sha256, tokenizer_hashes
from sdrt.errors import UserError

from . import lora_branch
from .bfloat16 import BF16_PARITY
from .calibration import CUDA, calibration_feeds, calibration_providers
from .families import export_family
from .families.text_encoders import vocab_size
from .lazy_weights import discard_sources, is_lazy
from .load import family_of
from .onnx_export import (
    OPSET,
    TOLERANCE,
    Component,
    ExportedOps,
    compare,
    export_onnx,
    reference_outputs,
    trace_dims,
    verify_onnx,
    weightless_trace,
)
from .optimize import static_variant_file, write_static_variant
from .stages import GIB, StageFn, StageWatch
from .streamed_export import export_streamed

# diffusers scheduler class -> the runtime's name for the same family
SCHEDULER_NAMES = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
    "UniPCMultistepScheduler": "unipc",
    "LMSDiscreteScheduler": "lms",
    "HeunDiscreteScheduler": "heun",
    "FlowMatchEulerDiscreteScheduler": "flow_match_euler",
}


# the per-step and the per-image graphs: where convolutions and GroupNorms are the cost, and
# where static shapes (CUDA graphs) pay
CUDA_FUSED = ("unet", "vae_decoder")
ORT_CUDA = ("fused_attention", "cuda_fusions")  # options that emit ONNX Runtime's fused ops


def native_size(pipe: Any) -> int:
    """The image side the model was trained at (pixels)."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return export_family(family_of(pipe)).native_size(pipe, vae_scale)


def check_destination(out: Path) -> None:
    """Refuse a filled destination, or one another export is writing; clear dead staging."""
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(
                f"{out} already exists and is not empty; choose a new bundle "
                "directory or remove it first"
            )
        if out.parent.is_dir():
            clear_staging(out)
        nearest = next(p for p in out.absolute().parents if p.exists())
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(nearest))
    except PermissionError as err:
        raise UserError(
            f"cannot write {err.filename or out}: permission denied; choose a folder you can "
            "write to"
        ) from err


def export_bundle(
    pipe: Any,
    out: Path,
    family: str,
    dtype: str = "fp32",
    tolerance: float | None = None,
    progress: bool = True,
    loras: list[dict[str, Any]] | None = None,
    fused_attention: bool = False,
    static_sizes: Sequence[tuple[int, int]] = (),
    cuda_fusions: bool = False,
    watch: StageWatch | None = None,
    release_weights: bool = False,
    lora_rank: int = 0,
) -> dict[str, Any]:
    """Export `pipe` to the bundle directory `out` and return the manifest written.

    `loras` are the records of LoRAs already fused into `pipe`, kept in the manifest.
    `fused_attention`, `cuda_fusions` and `static_sizes` (HxW) target ONNX Runtime CUDA: fused
    attention nodes, NHWC convolutions with fused normalisations in the U-Net and VAE decoder,
    and fixed-shape copies of those graphs so CUDA graphs can be captured. `watch` records
    each stage's time and peak RSS (the memory benchmark reads it). `release_weights` frees
    each component's PyTorch weights once verified, keeping the peak near one model's size;
    `pipe` cannot run afterwards. `lora_rank` R > 0 gives the denoiser and CLIP encoders the
    run-time LoRA branch of that rank (`lora_branch`).
    """
    if dtype not in TOLERANCE:
        raise UserError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    check_options(
        export_family(family),
        dtype,
        fused_attention,
        cuda_fusions,
        static_sizes,
        bool(loras),
        lora_rank,
    )
    out = Path(out)
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # check_destination vetted the nearest parent
    staging = staging_dir(out)
    try:
        manifest = _write_bundle(
            pipe,
            staging,
            family,
            dtype,
            TOLERANCE[dtype] if tolerance is None else tolerance,
            progress,
            loras,
            fused_attention,
            list(static_sizes),
            cuda_fusions,
            watch or StageWatch(),
            release_weights,
            lora_rank,
        )
        _normal_permissions(staging)
        _move_into_place(staging, out)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        full = disk_full(err)
        if full is not None:
            raise UserError(
                f"could not write the bundle {out}: {full.strerror}; nothing of it was kept; "
                "free some space or export elsewhere"
            ) from err
        raise
    return manifest


def check_options(
    kind: ModuleType,
    dtype: str,
    fused_attention: bool,
    cuda_fusions: bool,
    static_sizes: Sequence[tuple[int, int]],
    lora: bool = False,
    lora_rank: int = 0,
) -> None:
    """Refuse, in one line, the options this family's export does not implement."""
    asked = {  # option -> (its flag, whether it was asked for)
        "fp16": ("--dtype fp16", dtype == "fp16"),
        "fused_attention": ("--fused-attention", fused_attention),
        "cuda_fusions": ("--cuda-fusions", cuda_fusions),
        "static_sizes": ("--static-size", bool(static_sizes)),
        "lora": ("--lora", lora),
        "lora_rank": ("--lora-rank", lora_rank > 0),
    }
    supported = kind.OPTIONS
    refused = [flag for option, (flag, on) in asked.items() if on and option not in supported]
    ort_cuda_only = [flag for option, (flag, on) in asked.items() if on and option in ORT_CUDA]
    if dtype == "bf16" and ort_cuda_only:
        raise UserError(
            f"{', '.join(ort_cuda_only)} is not supported with --dtype bf16 (ONNX Runtime's fused "
            "kernels for it are unverified in bf16); export without it, or with --dtype fp16"
        )
    if refused:
        raise UserError(
            f"{', '.join(refused)} is not supported for {kind.LABEL} models yet; export without it "
            "(plain attention, dynamic shapes)"
        )


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging onto `out` (absent or empty); when another export filled
    `out` meanwhile, that one wins and this one says so."""
    try:
        staging.rename(out)  # replaces an empty directory, refuses a filled one
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise UserError(
            f"{out} was written by another export while this one ran; kept that one and "
            "discarded this one (export into a new directory to keep both)"
        ) from err


def _write_bundle(
    pipe: Any,
    root: Path,
    family: str,
    dtype: str,
    tolerance: float,
    progress: bool,
    loras: list[dict[str, Any]] | None,
    fused_attention: bool,
    static_sizes: list[tuple[int, int]],
    cuda_fusions: bool,
    watch: StageWatch,
    release_weights: bool,
    lora_rank: int,
) -> dict[str, Any]:
    kind = export_family(family)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    default_size = kind.native_size(pipe, vae_scale)
    multiple = kind.latent_multiple(pipe)
    latent = 2 * multiple
    for height, width in static_sizes:
        if height % (vae_scale * multiple) or width % (vae_scale * multiple):
            raise UserError(
                f"static size {height}x{width} is not a multiple of "
                f"{vae_scale * multiple} for this model"
            )
    dims = kind.add_dims(trace_dims(latent, vocab_size(pipe), vae_scale))
    check_dims = kind.add_dims(
        {
            **dims,
            "batch": 2,
            "unet_batch": 1,
            "latent_width": latent + multiple,
            "width": vae_scale * (latent + multiple),
        }
    )
    entries = {}
    if lora_rank and static_sizes:
        raise UserError(
            "--lora-rank cannot be combined with --static-size yet (the adapter inputs have "
            "dynamic sizes); export without one of them"
        )
    parts = kind.components(pipe)
    if lora_rank and any(is_lazy(c.module) for c in parts):
        raise UserError(
            "--lora-rank is not supported yet for a model exported with its weights on disk "
            "(a full-size transformer); export without it"
        )
    if dtype == "fp16":  # all first: the U-Net's needs the text encoders, which may be released
        size = calibration_latent_size(static_sizes, default_size, vae_scale, dims)
        for component in parts:
            with watch.stage(component.name, "fp16 calibrate"):
                component.calibration = calibration_feeds(pipe, component, dims, size)
    branch = None
    if lora_rank:  # after calibration, which runs the plain models
        branch = lora_branch.with_branches(pipe, parts, lora_rank)
        dims.update(lora_branch.branch_dims(lora_rank, check=False))
        check_dims.update(lora_branch.branch_dims(lora_rank, check=True))
    bar = tqdm(parts, desc="export", unit="component", disable=not progress)
    if progress:
        watch.on_change = _show_stage(bar)
    for index, component in enumerate(bar):
        stage = watch.for_component(component.name)
        release = _weight_release(component, parts[index + 1 :]) if release_weights else None
        entries[component.name] = _export_component(
            component,
            root,
            dims,
            check_dims,
            dtype,
            tolerance,
            fused_attention,
            cuda_fusions,
            bool(static_sizes),
            stage,
            release,
            progress,
        )
        if release:
            release()  # where export kept the weights (an fp16 VAE that may fall back)
        if component.name in CUDA_FUSED:
            with stage("write static") if static_sizes else nullcontext():
                entries[component.name]["static_variants"] = [
                    write_static_variant(
                        root / entries[component.name]["file"],
                        d,
                        root / static_variant_file(component.name, d),
                    )
                    for d in (static_dims(size, vae_scale, component) for size in static_sizes)
                ]
    folders = [c.name.replace("text_encoder", "tokenizer") for c in parts if "text" in c.name]
    for folder in folders:
        getattr(pipe, folder).save_pretrained(root / folder)
    scheduler_config = {
        k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")
    }
    manifest = {
        "family": family,
        **kind.manifest_fields(pipe),
        "default_size": [default_size, default_size],
        "size_multiple": vae_scale * multiple,
        "scheduler": SCHEDULER_NAMES.get(type(pipe.scheduler).__name__, "pndm"),
        "scheduler_config": json.loads(json.dumps(scheduler_config, default=list)),
        "components": entries,
        "tokenizer_files": tokenizer_hashes(root, folders),
        "fused_attention": fused_attention,
        "cuda_fusions": cuda_fusions,
        "loras": loras or [],
        **({"lora_branch": branch} if branch else {}),
        "export": _versions(dtype),
    }
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _export_component(
    component: Component,
    root: Path,
    dims: dict[str, int],
    check_dims: dict[str, int],
    dtype: str,
    tolerance: float,
    fused_attention: bool,
    cuda_fusions: bool,
    external_data: bool,
    stage: StageFn,
    release: Callable[[], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Export, verify and describe one component. PyTorch's reference outputs are computed
    first, so `release` (freeing its PyTorch weights) can run as soon as the graph is traced,
    unless a re-export may still follow."""
    path = root / f"{component.name}.onnx"
    may_fall_back = dtype == "fp16" and component.name.startswith("vae")
    with stage("reference"):
        want = reference_outputs(component, check_dims)

    streamed: list[np.ndarray] = []  # a lazy component's outputs, run segment by segment

    def export(dtype: str) -> ExportedOps:
        if is_lazy(component.module):
            feeds, check = component.sample_inputs(dims), component.sample_inputs(check_dims, 1)
            trace = weightless_trace(component)
            streamed[:] = export_streamed(
                component, feeds, check, path, dtype, stage, trace, progress
            )
            return ExportedOps()
        fuse = fused_attention and component.name == "unet"  # where attention is the cost
        nhwc = cuda_fusions and component.name in CUDA_FUSED
        traced = None if may_fall_back else release
        return export_onnx(component, dims, path, dtype, fuse, external_data, nhwc, stage, traced)

    def verify() -> dict[str, Any]:
        with stage("verify"):
            if streamed:
                return compare(streamed, want)
            return verify_onnx(component, path, check_dims, want)

    ops = export(dtype)
    parity = verify()
    fallback = None
    if may_fall_back and not _passes(parity, tolerance):
        # Some VAEs overflow fp16 (SDXL's does); measured, not assumed: keep this one fp32.
        fallback = (
            f"fp16 failed verification (max rel {parity['max_rel']:.1e}, finite "
            f"{parity['finite']}); kept in fp32"
        )
        dtype, tolerance = "fp32", TOLERANCE["fp32"]
        ops = export(dtype)
        parity = verify()
    if not _passes(parity, tolerance):
        hint = " (try --dtype fp32 for this model)" if dtype != "fp32" else ""
        raise UserError(
            f"{component.name}: ONNX Runtime output differs from PyTorch by "
            f"{parity['max_rel']:.2e} relative (max abs {parity['max_abs']:.2e}, finite: "
            f"{parity['finite']}), above the tolerance {tolerance:.0e}{hint}"
        )
    data = path.with_name(path.name + ".data")
    return {
        "file": path.name,
        "external_data": data.name if data.exists() else None,
        "sha256": file_sha256(path, data if data.exists() else None),
        "precision": dtype,
        "precision_note": fallback,
        # ORT contrib ops with CUDA kernels only: such a graph loads on ORT CUDA alone
        "cuda_only_ops": ops.cuda_only,
        # fused nodes ORT's CUDA kernels would refuse, written back as standard ONNX, by reason
        "cuda_unfused": ops.unfused,
        "inputs": [vars(s) for s in component.inputs],
        "outputs": [vars(s) for s in component.outputs],
        "parity": {
            "max_abs": parity["max_abs"],
            "max_rel": parity["max_rel"],
            "reference": "PyTorch fp32, CPU",
            "runtime": "ONNX Runtime CPU"
            + (", CUDA-only ops as standard ONNX" if ops.cuda_only else ""),
            **(BF16_PARITY if dtype == "bf16" else {}),
        },
    }


def _weight_release(component: Component, later: list[Component]) -> Callable[[], None]:
    """A function that frees the PyTorch weights of `component` that no `later` one uses, so
    export holds one model's weights, not the whole pipeline's, while it verifies."""

    def release() -> None:
        import torch

        if is_lazy(component.module):  # nothing in memory; a temporary checkpoint on disk
            discard_sources(component.module, [c.module for c in later])
            return
        kept = {id(p) for c in later for p in c.module.parameters()}
        for param in component.module.parameters():
            if id(param) not in kept:
                param.data = torch.empty(0, dtype=param.dtype)
        gc.collect()

    return release


def _show_stage(bar: tqdm) -> Callable[[str, str, int], None]:
    """Progress-bar postfix "unet: verify, RSS 6.1 GiB", redrawn at most twice a second."""
    shown = [0.0, ""]

    def show(component: str, stage: str, rss: int) -> None:
        now = time.monotonic()
        if stage != shown[1] or now - shown[0] >= 0.5:
            shown[:] = [now, stage]
            bar.set_postfix_str(f"{component}: {stage}, RSS {rss / GIB:.1f} GiB")

    return show


def _normal_permissions(root: Path) -> None:
    """Files as the user's umask would make them: onnx writes external data as 0600, which a
    serving account other than the exporting one could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def calibration_latent_size(
    static_sizes: Sequence[tuple[int, int]], default_size: int, vae_scale: int, dims: dict[str, int]
) -> tuple[int, int]:
    """Latent size for the fp16 measurement: the deployment size (the first static size, else
    the model's native one) where the CUDA provider measures; on the CPU, the trace size, since
    a full-size measurement there takes tens of minutes per component."""
    if CUDA not in calibration_providers():
        return dims["latent_height"], dims["latent_width"]
    height, width = static_sizes[0] if static_sizes else (default_size, default_size)
    return height // vae_scale, width // vae_scale


def static_dims(size: tuple[int, int], vae_scale: int, component: Component) -> dict[str, int]:
    """The component's dimension values for one image with guidance at HxW pixels."""
    height, width = size
    values = {
        "batch": 1,
        "unet_batch": 2,
        "height": height,
        "width": width,
        "latent_height": height // vae_scale,
        "latent_width": width // vae_scale,
    }
    named = {d for spec in component.inputs + component.outputs for d in spec.shape}
    return {k: v for k, v in values.items() if k in named}


def _passes(parity: dict[str, Any], tolerance: float) -> bool:
    return bool(parity["finite"]) and parity["max_rel"] <= tolerance


def _versions(dtype: str) -> dict[str, Any]:
    import diffusers
    import onnx
    import onnxruntime
    import torch

    import sdrt

    return {
        "sdrt": sdrt.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": OPSET,
        "dtype": dtype,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
