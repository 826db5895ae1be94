"""`sdrt bench`: time eager diffusers, torch.compile and each sdrt backend on one workload.

One run on one device gives every path the same prompt, seed, steps and size, and writes
bench.json, bench.md and bench.png. Registering the subcommand imports nothing heavy; PyTorch
loads when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdrt.cli import terminate_as_interrupt
from sdrt.errors import UserError

if TYPE_CHECKING:
    from .harness import Plan, Runner
    from .settings import Settings
    from .workload import Workload

SCHEMA = "sdrt-bench/1"
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"


@dataclass(frozen=True)
class Baseline:
    """What every other row is compared with: eager's batch-1 speed and images."""

    end_to_end_p50_ms: float
    images: Any  # float32 NHWC in [0, 1]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `bench` to the `sdrt` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="time eager diffusers, torch.compile and sdrt backends (needs sdrt[bench,cpu])",
        description=__doc__.splitlines()[0],
    )
    add_options(parser)
    parser.set_defaults(handler=cmd_bench)
    return parser


def add_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("model", nargs="?", help="diffusers folder or .safetensors file")
    model.add_argument(
        "--random-weights",
        metavar="PRESET",
        help="published architecture with random weights: tiny (default), sd15, sd21, sdxl",
    )
    model.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints")
    model.add_argument("--bundle", help="reuse this bundle (from the same model) for sdrt rows")
    run = parser.add_argument_group("workload")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if torch sees one")
    run.add_argument("--dtype", choices=("fp16", "fp32"), help="default: fp16 cuda, fp32 cpu")
    run.add_argument("--steps", type=int, help="default: 50 on cuda, 4 on cpu")
    run.add_argument("--height", type=int, help="default: the model's native size")
    run.add_argument("--width", type=int, help="default: the model's native size")
    run.add_argument("--scheduler", default="pndm", help="default: %(default)s")
    run.add_argument("--prompt", default=DEFAULT_PROMPT)
    run.add_argument("--negative-prompt", default="")
    run.add_argument("--guidance", type=float, default=7.5, help="default: %(default)s")
    run.add_argument("--seed", type=int, default=0, help="seed of the initial latents")
    timing = parser.add_argument_group("measurement")
    timing.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls before each figure (default: %(default)s)",
    )
    timing.add_argument(
        "--iterations", type=int, default=10, help="timed calls per figure (default: %(default)s)"
    )
    timing.add_argument(
        "--batch-sizes",
        default="1,4,8",
        help="end-to-end batches for images/s (default: %(default)s)",
    )
    timing.add_argument(
        "--torch-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add a torch.compile row (default: on for cuda, off for cpu)",
    )
    timing.add_argument(
        "--ort-fast-path",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="export the bundle for ONNX Runtime CUDA: --fused-attention --cuda-fusions and a "
        "static shape at the benchmark size (default: on for cuda, off for cpu)",
    )
    timing.add_argument("--backends", help="sdrt backends to time, comma-separated (default: all)")
    model.add_argument(
        "--max-memory", type=float, metavar="GIB", help="for the export, as `sdrt export` takes it"
    )
    parser.add_argument(
        "--out",
        default="bench-results",
        help="folder for bench.json/md/png, and nothing else (default: %(default)s)",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from .report import markdown

    result = run_bench(args)
    print(markdown(result), end="")
    return 1 if any(p["status"] == "failed" for p in result["paths"]) else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sdrt.benchmarks.cli [options]`, the same as `sdrt bench [options]`."""
    parser = argparse.ArgumentParser(prog="sdrt bench", description=__doc__.splitlines()[0])
    add_options(parser)
    args = parser.parse_args(argv)
    try:
        with terminate_as_interrupt():
            return cmd_bench(args)
    except UserError as err:
        print(f"sdrt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130


def run_bench(args: argparse.Namespace, report: Callable[[str], None] | None = None) -> dict:
    """Measure every path and write the three reports; returns what bench.json holds."""
    from sdrt.export.load import load_pipeline
    from sdrt.export.memory_estimate import check_export_memory

    from . import baselines
    from .harness import Plan, log
    from .report import write_json, write_reports
    from .sdrt_paths import check_same_model
    from .settings import resolve_settings

    report = report or log
    settings = resolve_settings(args, baselines.cuda_available())
    if settings.bundle is not None:  # a bad bundle fails here, before the slow model load
        settings = _sized(settings, settings.bundle)
    if settings.bundle is None:
        passes = settings.dtype == "fp16" or settings.ort_fast_path
        check_export_memory(settings.max_memory, settings.source, settings.random_weights, passes)
    settings.out.mkdir(parents=True, exist_ok=True)
    report(f"loading {settings.model}")
    pipe = load_pipeline(settings.source, settings.random_weights, settings.allow_pickle)
    if settings.bundle is not None:
        check_same_model(pipe, settings.bundle, settings.model)
    # the temporary bundle goes to the system's temporary folder: --out holds the reports only.
    # `sdrt bench` turns SIGTERM (`timeout`) into KeyboardInterrupt, which removes it too.
    with tempfile.TemporaryDirectory(prefix="sdrt-bench-bundle-") as tmp:
        bundle, export_s = settings.bundle, None
        if bundle is None:
            bundle = Path(tmp) / "bundle"
            export_s = _export(pipe, bundle, settings, report)
            settings = _sized(settings, bundle)
        plan = Plan(settings.warmup, settings.iterations, settings.batch_sizes)
        workload = _workload(pipe, settings)
        result = _new_result(settings, workload, export_s)

        def record(path: dict[str, Any]) -> None:
            result["paths"].append(path)
            write_json(result, settings.out / "bench.json")  # a killed run keeps finished rows

        baseline = _torch_paths(pipe, workload, settings, plan, record, report)
        del pipe  # the engines measured next get the device memory PyTorch held
        baselines.release_torch(settings.device)
        for backend in settings.backends:
            path = _sdrt_path(backend, bundle, export_s, workload, settings, plan, baseline, report)
            record(path)
    result["complete"] = True
    written = write_reports(result, settings.out)
    report("wrote " + ", ".join(str(p) for p in written))
    return result


def _new_result(settings: Settings, workload: Workload, export_s: float | None) -> dict[str, Any]:
    """bench.json before any path is measured: what, where, when and with which versions."""
    from . import environment
    from .baselines import device_name

    return {
        "schema": SCHEMA,
        "complete": False,
        "date": environment.now(),
        "command": environment.command_line(),
        "machine": environment.machine(settings.device, device_name(settings.device)),
        "versions": environment.versions(),
        "settings": _jsonable(asdict(settings)),
        "workload": workload.summary(),
        "bundle": {"path": _jsonable(settings.bundle), "export_s": export_s},
        "paths": [],
    }


def _sized(settings: Settings, bundle: Path) -> Settings:
    """Height and width checked against the bundle, defaulting to its native size."""
    from .sdrt_paths import bundle_size

    height, width = bundle_size(bundle, settings.height, settings.width)
    return replace(settings, height=height, width=width)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _export(pipe: Any, bundle: Path, settings: Settings, report: Callable[[str], None]) -> float:
    """Export `pipe` to `bundle`; the seconds it takes are the sdrt rows' build time."""
    from sdrt.export.bundle_writer import export_bundle, native_size
    from sdrt.export.families import export_family
    from sdrt.export.load import family_of

    fast: dict[str, Any] = {}
    if settings.ort_fast_path and "cuda_fusions" in export_family(family_of(pipe)).OPTIONS:
        native = native_size(pipe)
        size = (settings.height or native, settings.width or native)
        fast = {"fused_attention": True, "cuda_fusions": True, "static_sizes": [size]}
    what = "ONNX Runtime CUDA fast-path " if fast else ""
    report(f"exporting a {settings.dtype} {what}bundle (timed as the sdrt build)")
    start = time.perf_counter()
    export_bundle(pipe, bundle, family_of(pipe), settings.dtype, None, progress=True, **fast)
    seconds = time.perf_counter() - start
    report(f"  exported in {seconds:.1f} s")
    return seconds


def _workload(pipe: Any, settings: Settings) -> Workload:
    from .workload import make_workload

    return make_workload(
        pipe,
        prompt=settings.prompt,
        negative_prompt=settings.negative_prompt,
        steps=settings.steps,
        guidance=settings.guidance,
        scheduler=settings.scheduler,
        height=settings.height,
        width=settings.width,
        seed=settings.seed,
        batch_sizes=settings.batch_sizes,
    )


def _torch_paths(
    pipe: Any,
    workload: Workload,
    settings: Settings,
    plan: Plan,
    record: Callable[[dict[str, Any]], None],
    report: Callable[[str], None],
) -> Baseline:
    """Record the eager row (and torch.compile's); returns what the other rows are
    compared with."""
    from .baselines import TorchRunner, compile_pipeline, prepare_eager

    pipe, load_s, details = prepare_eager(pipe, settings.device, settings.dtype)
    label = f"eager diffusers, {settings.dtype}, {details['attention']}"
    report(f"eager: {label}")
    eager, reference = _measure(
        "eager", label, TorchRunner(pipe, workload, settings.device), plan, report
    )
    eager.update(
        details=details, build_s=None, load_s=load_s, speedup_vs_eager=1.0, diff_vs_eager=None
    )
    record(eager)
    baseline = Baseline(eager["end_to_end_ms"]["p50"], reference)
    if settings.torch_compile:

        def compiled() -> dict[str, Any]:
            compile_details = compile_pipeline(pipe, settings.device)
            label = f"torch.compile mode={compile_details['mode']}"
            report(f"torch_compile: {label}; the first call compiles")
            runner = TorchRunner(pipe, workload, settings.device)
            path, images = _measure("torch_compile", label, runner, plan, report)
            path.update(details={**details, **compile_details}, load_s=None)
            path["build_s"] = path["first_call_ms"] / 1e3  # compilation happens in that call
            return _compare(path, images, baseline)

        record(_attempt("torch_compile", "torch.compile", compiled, report))
    return baseline


def _sdrt_path(
    backend: str,
    bundle: Path,
    export_s: float | None,
    workload: Workload,
    settings: Settings,
    plan: Plan,
    baseline: Baseline,
    report: Callable[[str], None],
) -> dict[str, Any]:
    from .sdrt_paths import load_runner

    name = f"sdrt_{backend}"

    def measured() -> dict[str, Any]:
        runner, load_s, details = load_runner(bundle, backend, settings.device, workload)
        label = f"sdrt {backend}, {'/'.join(details['precision'])}, {'/'.join(details['provider'])}"
        parts = ", ".join(f"{k} {v:.0f} ms" for k, v in details["load_ms"].items())
        report(f"{name}: {label}, loaded in {load_s:.2f} s ({parts})")
        path, images = _measure(name, label, runner, plan, report)
        path.update(details=details, build_s=export_s, load_s=load_s)
        return _compare(path, images, baseline)

    return _attempt(name, f"sdrt {backend}", measured, report)


def _measure(
    name: str, label: str, runner: Runner, plan: Plan, report: Callable[[str], None]
) -> tuple[dict[str, Any], Any]:
    from .harness import measure_path

    figures, images = measure_path(runner, plan, report)
    return {"name": name, "label": label, "status": "ok", **figures}, images


def _compare(path: dict[str, Any], images: Any, baseline: Baseline) -> dict[str, Any]:
    """Speed-up of end-to-end p50 over eager, and the image difference on the same latents."""
    from sdrt.export.parity import image_difference

    path["speedup_vs_eager"] = baseline.end_to_end_p50_ms / path["end_to_end_ms"]["p50"]
    path["diff_vs_eager"] = image_difference(images, baseline.images)
    return path


def _attempt(
    name: str, label: str, measure: Callable[[], dict[str, Any]], report: Callable[[str], None]
) -> dict[str, Any]:
    """Run an optional path; a missing backend or engine is a skip, any other error a failed
    row. A long GPU run must not lose the rows already measured to one broken path."""
    try:
        return measure()
    except UserError as err:
        report(f"{name}: skipped: {err}")
        return {"name": name, "label": label, "status": "skipped", "reason": str(err)}
    except Exception as err:
        traceback.print_exc()
        report(f"{name}: failed: {type(err).__name__}: {err}")
        return {
            "name": name,
            "label": label,
            "status": "failed",
            "reason": f"{type(err).__name__}: {err}",
        }


if __name__ == "__main__":
    sys.exit(main())
