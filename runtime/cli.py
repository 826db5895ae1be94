"""The `sdrt` command: export, generate, info, sign, verify, demo, build (TensorRT), bench,
serve.

User mistakes end as one line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .arguments import DEFAULT_MAX_IMAGES, DEFAULT_MAX_PIXELS
from .engine_cache import ENGINES_DIR, read_entry
from .errors import UserError
from .lora_pool import DEFAULT_MAX_LORAS

MAX_MEMORY_HELP = (
    "refuse to start when the estimated peak RAM exceeds this many GiB (default: never "
    "refuse, warn when above the memory available now; 0 turns the check off)"
)
MAX_LORA_RANK = 1024
DEMO_PROMPT = "a red bicycle leaning on a wall, watercolor"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.formatwarning = _warning_line
    try:
        with terminate_as_interrupt():
            return args.handler(args)
    except UserError as err:
        print(f"sdrt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130


def _warning_line(message: Warning | str, *_: Any, **__: Any) -> str:
    """A warning as one line, as errors are: the user needs the message, not sdrt's source."""
    return f"sdrt: warning: {message}\n"


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what `kill`, systemd and container runtimes send) unwinds like Ctrl-C, so the
    cleanup that removes staging directories and temporary files runs for it too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    export = commands.add_parser("export", help="export a checkpoint to an engine bundle")
    export.add_argument("source", nargs="?", help="diffusers folder or .safetensors file")
    export.add_argument("bundle", help="new bundle directory to write")
    _add_model_source_options(export)
    add_graph_options(export)
    export.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA .safetensors fused into the weights at SCALE (default 1.0); repeatable",
    )
    export.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="give the U-Net and text encoders a run-time LoRA branch of rank R, so adapters "
        "load per request (`generate --lora`, `serve --lora-dir`); default 0, none",
    )
    export.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GIB",
        help=MAX_MEMORY_HELP,
    )
    export.set_defaults(handler=cmd_export)

    generate = commands.add_parser("generate", help="generate images from a bundle")
    generate.add_argument("bundle")
    _add_generation_options(generate)
    generate.add_argument(
        "--output", default="out.png", help="PNG path; with several images, -N is added before .png"
    )
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument(
        "--max-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help=f"refuse --num-images above this (default {DEFAULT_MAX_IMAGES})",
    )
    generate.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse outputs and input images of more pixels (default {DEFAULT_MAX_PIXELS})",
    )
    generate.add_argument(
        "--image", help="start from this picture (img2img, or inpainting with --mask)"
    )
    generate.add_argument("--mask", help="inpainting mask: white is repainted, black kept")
    generate.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH[:SCALE]",
        help="apply this LoRA file at SCALE (default 1.0) at run time; repeatable (the bundle "
        "must be exported with --lora-rank)",
    )
    generate.add_argument(
        "--strength",
        type=float,
        default=None,
        help="how much of the schedule to run from --image (default 0.8; 1.0 with --mask)",
    )
    generate.set_defaults(handler=cmd_generate)

    build = commands.add_parser(
        "build", help="compile a bundle's ONNX graphs to TensorRT engines for this GPU"
    )
    build.add_argument("bundle")
    build.add_argument("--batch", default="1-4", help="images per request, MIN-MAX (default 1-4)")
    build.add_argument("--height", default="256-1024", help="pixels, MIN-MAX (default 256-1024)")
    build.add_argument("--width", default="256-1024", help="pixels, MIN-MAX (default 256-1024)")
    build.add_argument("--opt", help="HEIGHTxWIDTH to tune for (default 512x512 within range)")
    build.add_argument("--static", help="one HEIGHTxWIDTH for min, opt and max")
    build.add_argument("--opt-batch", type=int, help="batch to tune for (default: the minimum)")
    build.add_argument(
        "--guidance",
        choices=("cfg", "none", "both"),
        default="cfg",
        help="U-Net batch: doubled for classifier-free guidance (cfg), plain, or both",
    )
    build.add_argument("--vae-precision", choices=("auto", "fp16", "fp32"), default="auto")
    build.add_argument("--timing-cache", help="timing cache file, reused and updated")
    build.add_argument("--workspace", type=float, help="builder workspace limit in GiB")
    build.add_argument("--optimization-level", type=int, default=3, choices=range(6))
    build.add_argument("--components", nargs="+", help="only these components")
    build.add_argument("--force", action="store_true", help="rebuild even if engines exist")
    build.add_argument(
        "--max-loras",
        type=int,
        default=DEFAULT_MAX_LORAS,
        help="largest run-time LoRA pool the engines take, as `serve --max-loras` (default 16)",
    )
    build.set_defaults(handler=cmd_build)

    from sdrt.benchmarks.cli import register as register_bench  # argparse only; cheap
    from sdrt.benchmarks.serve_load import register as register_bench_serve

    from .serve.command import register as register_serve

    register_serve(commands)
    register_bench_serve(commands)

    register_bench(commands)

    from sdrt.serve.triton_repo import register as register_triton_repo

    register_triton_repo(commands)

    info = commands.add_parser("info", help="verify a bundle and print what it holds")
    info.add_argument("bundle")
    info.add_argument("--json", action="store_true", help="print the whole manifest")
    info.add_argument(
        "--no-verify", action="store_true", help="skip the sha256 checks (paths are still checked)"
    )
    info.set_defaults(handler=cmd_info)

    sign = commands.add_parser(
        "sign", help="sign a bundle (or a run-time LoRA .safetensors) with an EC private key"
    )
    sign.add_argument("bundle", help="bundle folder, or a LoRA file (signature: FILE.sig)")
    sign.add_argument("--key", required=True, help="private key, PEM")
    sign.set_defaults(handler=cmd_sign)

    verify = commands.add_parser(
        "verify", help="check a bundle's signature with a public key, then the bundle itself"
    )
    verify.add_argument("bundle")
    verify.add_argument("--key", required=True, help="public key, PEM")
    verify.set_defaults(handler=cmd_verify)

    demo = commands.add_parser(
        "demo", help="tiny model: export, generate, compare with diffusers (needs sdrt[export,cpu])"
    )
    demo.add_argument("--output", default="sdrt-demo.png")
    demo.add_argument("--steps", type=int, default=10)
    demo.add_argument("--scheduler", default="dpmpp_2m")
    demo.set_defaults(handler=cmd_demo)
    return parser


def add_graph_options(parser: argparse.ArgumentParser) -> None:
    """How export writes and checks the graphs (shared with the export memory benchmark)."""
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument(
        "--fused-attention",
        action="store_true",
        help="emit ONNX Runtime's fused MultiHeadAttention (faster on ORT CUDA; not for TensorRT)",
    )
    parser.add_argument(
        "--cuda-fusions",
        action="store_true",
        help="NHWC convolutions and fused GroupNorm/GEGLU in the U-Net and VAE decoder "
        "(ONNX Runtime CUDA only)",
    )
    parser.add_argument(
        "--static-size",
        action="append",
        default=[],
        metavar="HxW",
        help="also write fixed-shape graphs for this size (ORT CUDA graphs); repeatable",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max relative ONNX-vs-PyTorch error (default 1e-3 fp32, 3e-2 fp16, 6e-2 bf16)",
    )


def _add_model_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--random-weights",
        metavar="PRESET",
        help="build a published architecture with random weights: tiny, sd15, sd21, sdxl, "
        "sd35-medium, sd35-large, flux-dev, flux-schnell (tiny-* for tests)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.bin checkpoints (unpickling can run arbitrary code)",
    )


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument(
        "--negative-prompt", default=None, help="default: none (SDXL: zero embeddings)"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default=None, help="default: the bundle's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (GPU N)")
    parser.add_argument(
        "--trusted-key", help="public key (PEM): refuse the bundle unless signed by its pair"
    )


def _export_module() -> Any:
    try:
        import onnxruntime  # noqa: F401 - verification runs every graph on it

        from sdrt import export
        from sdrt.export import bundle_writer, load
    except ImportError as err:
        raise UserError(
            f"export needs PyTorch, diffusers and ONNX Runtime ({err.name} is missing); "
            "run `pip install 'sdrt[export,cpu]'` (or 'sdrt[export,cuda13]' on a GPU machine)"
        ) from err
    return export, load, bundle_writer


def cmd_export(args: argparse.Namespace) -> int:
    _, load, bundle_writer = _export_module()
    from sdrt.export import lora

    if args.source is None and args.random_weights is None:
        raise UserError(
            "give a model to export, or --random-weights tiny|sd15|sd21|sdxl|sd35-medium|"
            "sd35-large|flux-dev|flux-schnell"
        )
    bundle_writer.check_destination(Path(args.bundle))
    if not 0 <= args.lora_rank <= MAX_LORA_RANK:
        raise UserError(f"--lora-rank {args.lora_rank} is outside 0-{MAX_LORA_RANK}; try 32")
    loras = [lora.parse_lora_arg(arg) for arg in args.lora]
    static_sizes = [parse_size(size, "--static-size") for size in args.static_size]
    kind = load.source_family(args.source, args.random_weights)
    if kind is not None:  # an option the family lacks: before the slow model load
        bundle_writer.check_options(
            kind,
            args.dtype,
            args.fused_attention,
            args.cuda_fusions,
            static_sizes,
            bool(loras),
            args.lora_rank,
        )
    for path, _ in loras:  # fail on a typo before the slow model load
        lora.check_lora_file(path)
    if args.random_weights is None:  # a file that is not what it says, before the estimate
        load.checked_source(args.source, args.allow_pickle)
    _check_export_memory(args)
    started = time.perf_counter()
    print(f"loading {args.source or 'random weights: ' + args.random_weights}", file=sys.stderr)
    with load.opened_pipeline(args.source, args.random_weights, args.allow_pickle) as pipe:
        records = lora.apply_loras(pipe, loras) if loras else []
        manifest = _export(
            bundle_writer,
            load,
            pipe,
            Path(args.bundle),
            args.dtype,
            args.tolerance,
            args.random_weights,
            records,
            fused_attention=args.fused_attention,
            static_sizes=static_sizes,
            cuda_fusions=args.cuda_fusions,
            lora_rank=args.lora_rank,
            release_weights=True,  # the pipeline is not used again: hold one model at a time
        )
    print(f"wrote {args.bundle} in {time.perf_counter() - started:.1f} s")
    _print_parity(manifest)
    return 0


def _check_export_memory(args: argparse.Namespace) -> None:
    """Check the estimated peak RAM against --max-memory before loading anything."""
    from sdrt.export.memory_estimate import check_export_memory

    passes = args.dtype != "fp32" or args.cuda_fusions
    check_export_memory(args.max_memory, args.source, args.random_weights, passes)


def _export(
    bundle_writer: Any,
    load: Any,
    pipe: Any,
    out: Path,
    dtype: str,
    tolerance: float | None,
    preset: str | None,
    loras: list[dict[str, Any]] | None = None,
    **options: Any,
) -> dict[str, Any]:
    from sdrt.export.presets import PRESETS

    family = PRESETS[preset]["family"] if preset else load.family_of(pipe)
    return bundle_writer.export_bundle(pipe, out, family, dtype, tolerance, loras=loras, **options)


def parse_range(text: str, what: str) -> tuple[int, int]:
    """ "1-4" -> (1, 4); "4" -> (4, 4)."""
    parts = [p.strip() for p in text.strip().split("-")]
    if len(parts) in (1, 2) and all(p.isascii() and p.isdigit() for p in parts):
        low, high = int(parts[0]), int(parts[-1])
        return low, high
    raise UserError(f"{what} {text!r} is not a range; write MIN-MAX (e.g. 1-4) or one number")


def parse_size(text: str, what: str) -> tuple[int, int]:
    """ "512x768" -> (512, 768), as HEIGHTxWIDTH."""
    parts = [p.strip() for p in text.strip().lower().split("x")]
    if len(parts) == 2 and all(p.isascii() and p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    raise UserError(f"{what} {text!r} is not a size; write HEIGHTxWIDTH (e.g. 512x768)")


def _print_parity(manifest: dict[str, Any]) -> None:
    for name, entry in manifest["components"].items():
        parity = entry["parity"]
        print(
            f"  {name:13s} {entry['precision']}  max abs {parity['max_abs']:.2e}  "
            f"max rel {parity['max_rel']:.2e} vs PyTorch"
        )
    checks = {
        (p["check"], p["note"])
        for e in manifest["components"].values()
        if "note" in (p := e["parity"])
    }
    for check, note in sorted(checks):
        print(f"  checked: {check}; {note}")


def cmd_generate(args: argparse.Namespace) -> int:
    from .arguments import Limits
    from .images import generation_metadata, save_png
    from .lora_files import check_lora_file, parse_named_lora_arg
    from .pipeline import Pipeline

    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    paths = _output_paths(_check_output(Path(args.output)), args.num_images)
    image = _open_image(args.image, "--image", args.max_pixels) if args.image else None
    mask = _open_image(args.mask, "--mask", args.max_pixels) if args.mask else None
    loras = [parse_named_lora_arg(arg) for arg in args.lora]
    for _, path, _ in loras:  # a typo fails before the engines load
        check_lora_file(path)
    pipe = Pipeline.load(
        args.bundle, backend=args.backend, device=args.device, trusted_key=args.trusted_key
    )
    for name, path, _ in loras:
        pipe.load_lora(name, path)
    pipe.limits = Limits(max_images=args.max_images, max_pixels=args.max_pixels)
    call = {
        "prompt": [args.prompt] * args.num_images,
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "height": args.height,
        "width": args.width,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "image": image,
        "mask_image": mask,
        "strength": args.strength,
        "loras": {name: scale for name, _, scale in loras},
    }
    metadata = generation_metadata(
        pipe.arguments(**call),
        Path(args.image).name if args.image else None,
        Path(args.mask).name if args.mask else None,
    )
    out = pipe(**call, progress=True)
    for path, image in zip(paths, out.images, strict=True):
        save_png(image, path, metadata)
        print(f"wrote {path}")
    _print_timings(out.timings)
    return 0


def _check_output(path: Path) -> Path:
    """Refuse an output path that could not be written, before minutes of generation."""
    if path.suffix.lower() != ".png":
        raise UserError(
            f"--output {path} must end in .png: sdrt writes PNGs, whose text chunks record "
            "how the image was made"
        )
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"--output folder {folder} does not exist; create it first")
    if path.is_dir():
        raise UserError(f"--output {path} is a directory; name a .png file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write {folder}: permission denied; choose a folder you can write to"
        )
    return path


def _open_image(path: str, flag: str, max_pixels: int) -> Any:
    """Read a picture, refusing what is not a regular file (a FIFO would block forever) and,
    from its header before decoding, one above the pixel limit (a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.exists():
        raise UserError(f"{flag} {path} does not exist")
    if not file.is_file():
        raise UserError(f"{flag} {path} is not a regular file; pass an image file")
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours, just below, rules
    try:
        with Image.open(file) as image:
            if image.width * image.height > max_pixels:
                raise UserError(
                    f"{flag} {path} is {image.width}x{image.height} pixels, above the limit of "
                    f"{max_pixels}; pass a smaller image or raise --max-pixels"
                )
            return image.copy()
    except PermissionError as err:
        raise UserError(f"cannot read {flag} {path}: permission denied") from err
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{flag} {path} is not an image PIL can read ({err})") from err
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def _output_paths(path: Path, count: int) -> list[Path]:
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _print_timings(timings: dict[str, float]) -> None:
    for stage in (
        "text_encoder_ms",
        "unet_ms",
        "unet_step_ms",
        "scheduler_ms",
        "vae_decode_ms",
        "total_ms",
    ):
        if stage in timings:
            print(f"  {stage:16s} {timings[stage]:10.1f}")


def cmd_build(args: argparse.Namespace) -> int:
    try:
        from sdrt.export import tensorrt_build as trt_build
    except ImportError as err:
        raise UserError(
            f"sdrt build needs the export extra ({err.name} is missing); "
            "run `pip install 'sdrt[export,tensorrt]'`"
        ) from err
    started = time.perf_counter()
    out = trt_build.build_engines(
        args.bundle,
        batch=parse_range(args.batch, "--batch"),
        height=parse_range(args.height, "--height"),
        width=parse_range(args.width, "--width"),
        opt=parse_size(args.opt, "--opt") if args.opt else None,
        static=parse_size(args.static, "--static") if args.static else None,
        opt_batch=args.opt_batch,
        guidance=args.guidance,
        vae_precision=args.vae_precision,
        timing_cache=args.timing_cache,
        workspace_gb=args.workspace,
        optimization_level=args.optimization_level,
        components=args.components,
        force=args.force,
        max_loras=args.max_loras,
    )
    print(f"engines in {out} ({time.perf_counter() - started:.1f} s)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    bundle = Bundle.load(args.bundle, verify_hashes=not args.no_verify)
    manifest = bundle.manifest
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"bundle         {bundle.root}")
    print(f"family         {manifest['family']}  ({manifest['prediction_type']})")
    print(
        f"size           default {manifest['default_size'][0]}x{manifest['default_size'][1]}, "
        f"multiples of {manifest.get('size_multiple', 8)}"
    )
    print(f"scheduler      {manifest['scheduler']}")
    loras = ", ".join(f"{r['file']}:{r['scale']}" for r in manifest.get("loras", [])) or "none"
    print(f"loras          {loras}")
    attention = "fused (ONNX Runtime only)" if manifest.get("fused_attention") else "plain"
    print(f"attention      {attention}")
    print(
        "cuda fusions   "
        + ("yes (runs on ONNX Runtime CUDA only)" if manifest.get("cuda_fusions") else "no")
    )
    _print_engines(bundle.root / ENGINES_DIR)
    for name, entry in manifest["components"].items():
        size = sum(
            (bundle.root / f).stat().st_size
            for f in (entry["file"], entry.get("external_data"))
            if f
        )
        print(
            f"{name:14s} {entry['file']}  {entry['precision']}  {size / 2**20:.1f} MiB"
            + (f"  parity max rel {entry['parity']['max_rel']:.1e}" if "parity" in entry else "")
            + (f" ({entry['parity']['runtime']})" if "note" in entry.get("parity", {}) else "")
            + (
                f"  static shapes: {len(entry['static_variants'])}"
                if entry.get("static_variants")
                else ""
            )
        )
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from .bundle import Bundle
    from .lora_files import LORA_SUFFIX
    from .signing import sign_bundle, sign_file

    if args.bundle.lower().endswith(LORA_SUFFIX):  # a run-time LoRA file
        print(f"wrote {sign_file(args.bundle, args.key)}")
        return 0
    Bundle.load(args.bundle)  # sign only what loads: a signature vouches for a sound bundle
    print(f"wrote {sign_bundle(args.bundle, args.key)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    Bundle.load(args.bundle, trusted_key=args.key)
    print(f"{args.bundle}: signature valid for {args.key}, files match the manifest")
    return 0


def _print_engines(engines_root: Path) -> None:
    """Each built engines/<key> directory, and per engine its precision and, for fp16, where
    the fp16 types came from (the bundle's ONNX, TensorRT 10's flag, or a build-time copy)."""
    directories = sorted(
        p for p in engines_root.glob("*") if p.is_dir() and not p.name.startswith(".")
    )
    if not directories:
        print("engines        none (sdrt build makes TensorRT engines)")
    for directory in directories:
        print(f"engines        {directory.name}")
        try:
            entry = read_entry(directory)
        except UserError as err:
            print(f"  {err}")
            continue
        for name, component in entry.spec.components.items():
            source = entry.fp16_sources.get(name, "")
            print(f"  {name:14s} {component.precision}  {source}".rstrip())


def cmd_demo(args: argparse.Namespace) -> int:
    _, load, bundle_writer = _export_module()
    import numpy as np

    from sdrt.export.parity import image_difference, run_diffusers

    from .images import save_png
    from .pipeline import Pipeline

    pipe = load.load_pipeline(None, random_weights="tiny")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        _export(bundle_writer, load, pipe, bundle, "fp32", None, "tiny")
        runtime = Pipeline.load(bundle, device="cpu")
        size = runtime.manifest["default_size"]
        latents = np.random.default_rng(0).standard_normal(
            (1, runtime.manifest["latent_channels"], size[0] // 8, size[1] // 8), np.float32
        )
        call = {"num_inference_steps": args.steps, "guidance_scale": 7.5}
        ours = runtime(
            DEMO_PROMPT,
            negative_prompt="blurry",
            scheduler=args.scheduler,
            latents=latents,
            output_type="np",
            **call,
        )
        eager = run_diffusers(
            pipe, args.scheduler, latents, prompt=DEMO_PROMPT, negative_prompt="blurry", **call
        )
    from .images import numpy_to_pil

    save_png(
        numpy_to_pil(ours.images)[0],
        args.output,
        {"prompt": DEMO_PROMPT, "steps": args.steps, "scheduler": args.scheduler},
    )
    print(f"wrote {args.output} (tiny random-weight model, {size[0]}x{size[1]})")
    _print_timings(ours.timings)
    diff = image_difference(ours.images, eager)
    print(
        f"max abs difference vs eager diffusers (same latents): {diff['max_abs']:.2e}  "
        f"PSNR {diff['psnr_db']:.1f} dB"
    )
    return 0 if diff["max_abs"] <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
