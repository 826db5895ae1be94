"""Compile a bundle's ONNX graphs into TensorRT engines, one optimization profile each.

The user speaks in images and pixels (batch 1-4, height 256-1024, opt 512x512, or one static
size); `component_dims` turns that into each graph's named dimensions (U-Net and text-encoder
batch doubled for classifier-free guidance, latent sizes = pixels / vae_scale_factor) and
`component_profile` into min/opt/max shapes. Engines are written through `sdrt.engine_cache`
(staged directory renamed into place), so a failed or interrupted build leaves nothing behind
that a later run would trust. TensorRT is imported only when a build starts.

Every network is built strongly typed: the engine computes in its ONNX's types. fp16 engines
come from one of two places, recorded per engine in engine.json (`fp16_source`): the bundle's
fp16 ONNX, or an fp16 ONNX converted at build time from an fp32 bundle with the export's
measured keep-fp32 policy (`sdrt.export.fp16_onnx`), written inside the staging directory and
deleted after its engine is built. TensorRT 10's weak typing (`BuilderFlag.FP16`) is not used:
it may lower the timestep embedding that every other path keeps fp32, and TensorRT 11 removed
it, so one conversion serves TensorRT 10, 11 and TensorRT-RTX alike. A bf16 bundle's engines
are bf16, built from its bf16 ONNX the same strongly typed way (no BuilderFlag.BF16 either).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdrt.backends.tensorrt import (
    CUDA_EXTRAS,
    TensorRT,
    cuda_device_index,
    current_environment,
    driver_cuda_major,
    import_cudart,
    import_tensorrt,
    shared_device,
    trt_logger,
)
from sdrt.bundle import COMPONENTS, Bundle, ComponentInfo
from sdrt.engine_cache import (
    ENGINE_SUFFIX,
    ENGINES_DIR,
    GUIDANCE_MODES,
    RECORD,
    ComponentSpec,
    EngineSpec,
    Environment,
    Profile,
    ShapeRange,
    SizeRanges,
    Span,
    cache_key,
    engine_dir,
    entry_problems,
    environment_tag,
    read_entry,
    record_json,
    staged_directory,
    write_atomic,
)
from sdrt.errors import UserError
from sdrt.families import family_for
from sdrt.lora_pool import DEFAULT_MAX_LORAS, check_max_loras

from .fp16_onnx import calibration_feeds, write_fp16_onnx

DEFAULT_BATCH = (1, 4)
DEFAULT_HEIGHT = (256, 1024)
DEFAULT_WIDTH = (256, 1024)
DEFAULT_OPT_SIZE = 512  # clamped into the range when no opt size is given
PRECISIONS = ("fp16", "fp32")
VAE_PRECISIONS = ("auto", *PRECISIONS)
BF16 = "bf16"  # engines of a bf16 bundle: built from its bf16 ONNX as it is
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
MAX_OPTIMIZATION_LEVEL = 5
FP16_FROM_BUNDLE = "bundle fp16 ONNX"

Log = Callable[[str], None]


def size_ranges(
    *,
    batch: tuple[int, int] = DEFAULT_BATCH,
    height: tuple[int, int] = DEFAULT_HEIGHT,
    width: tuple[int, int] = DEFAULT_WIDTH,
    opt: tuple[int, int] | None = None,
    static: tuple[int, int] | None = None,
    opt_batch: int | None = None,
    guidance: str = "cfg",
    size_multiple: int = 8,
) -> SizeRanges:
    """Validate the user's ranges and fill in the opt values; UserError naming a bad one."""
    if guidance not in GUIDANCE_MODES:
        raise UserError(
            f"guidance {guidance!r} is unknown; choose one of {', '.join(GUIDANCE_MODES)}"
        )
    batch_span = _span("batch", batch, opt_batch if opt_batch is not None else batch[0], 1)
    if static is not None:
        height, width, opt = (static[0], static[0]), (static[1], static[1]), static
    opt_h = opt[0] if opt else _clamp(DEFAULT_OPT_SIZE, height)
    opt_w = opt[1] if opt else _clamp(DEFAULT_OPT_SIZE, width)
    return SizeRanges(
        batch=batch_span,
        height=_span("height", height, opt_h, size_multiple),
        width=_span("width", width, opt_w, size_multiple),
        guidance=guidance,
    )


def _clamp(value: int, bounds: tuple[int, int]) -> int:
    return min(max(value, bounds[0]), bounds[1])


def _span(what: str, bounds: tuple[int, int], opt: int, multiple: int) -> Span:
    low, high = bounds
    if low < 1:
        raise UserError(f"{what} must be at least 1, got {low}")
    if low > high:
        raise UserError(
            f"{what} range {low}-{high} has its minimum above its maximum; write it as MIN-MAX"
        )
    for label, value in (("minimum", low), ("maximum", high), ("opt", opt)):
        if value % multiple:
            below = value - value % multiple
            raise UserError(
                f"{what} {label} {value} is not a multiple of {multiple}, which this model "
                f"needs; use {below or multiple} or {below + multiple}"
            )
    if not low <= opt <= high:
        raise UserError(f"opt {what} {opt} is outside the {what} range {low}-{high}")
    return (low, opt, high)


# ---- profiles -----------------------------------------------------------------------------


def guided_batch(sizes: SizeRanges) -> Span:
    """Batch of the U-Net: the pipeline stacks negative and positive conditioning."""
    low, opt, high = sizes.batch
    if sizes.guidance == "none":
        return sizes.batch
    if sizes.guidance == "both":
        return (low, 2 * opt, 2 * high)
    return (2 * low, 2 * opt, 2 * high)


def component_dims(component: str, sizes: SizeRanges, vae_scale: int) -> dict[str, Span]:
    """Every named dimension of `component`'s graph as (min, opt, max)."""
    for what, span in (("height", sizes.height), ("width", sizes.width)):
        if any(v % vae_scale for v in span):
            raise UserError(f"{what} {span} must be multiples of the VAE scale factor {vae_scale}")
    guided = guided_batch(sizes)
    # Text encoders see 2 x batch when negative prompts are encoded, but only the prompts
    # when guidance is off or the model uses zeros for an empty negative prompt (SDXL).
    text = (sizes.batch[0], guided[1], guided[2])
    # Flux: one token per 2x2 latent patch
    tokens = [
        (h // (2 * vae_scale)) * (w // (2 * vae_scale))
        for h, w in zip(sizes.height, sizes.width, strict=True)
    ]
    return {
        "batch": text if component in TEXT_ENCODERS else sizes.batch,
        "unet_batch": guided,
        "height": sizes.height,
        "width": sizes.width,
        "latent_height": _div(sizes.height, vae_scale),
        "latent_width": _div(sizes.width, vae_scale),
        "image_tokens": (tokens[0], tokens[1], tokens[2]),
    }


def lora_dims(
    branch: Mapping[str, Any] | None, max_loras: int = DEFAULT_MAX_LORAS
) -> dict[str, Span]:
    """The run-time LoRA inputs' dimensions (export --lora-rank R): 1 to R rank columns per
    row, and the pool's banks, (slots + 1) x R rows for a pool of 1 to `max_loras` slots
    (`sdrt serve --max-loras`), tuned for the largest; the runtime binds them once."""
    if not branch:
        return {}
    check_max_loras(max_loras, "--max-loras")
    rank = int(branch["rank"])
    rows = (max_loras + 1) * rank
    return {"lora_rank": (1, 1, rank), "lora_bank": (2 * rank, rows, rows)}


def _div(span: Span, by: int) -> Span:
    return (span[0] // by, span[1] // by, span[2] // by)


def component_profile(info: ComponentInfo, dims: Mapping[str, Span]) -> Profile:
    """min/opt/max shape of each input, from the manifest's symbolic shapes."""
    profile: Profile = {}
    for spec in info.inputs:
        spans: list[Span] = []
        for dim in spec["shape"]:
            if isinstance(dim, int):
                spans.append((dim, dim, dim))
            elif dim in dims:
                spans.append(dims[dim])
            else:
                raise UserError(
                    f"{info.name} input {spec['name']!r} has a dimension {dim!r} this sdrt "
                    "cannot size; re-export the bundle with this sdrt"
                )
        profile[spec["name"]] = ShapeRange(
            tuple(s[0] for s in spans), tuple(s[1] for s in spans), tuple(s[2] for s in spans)
        )
    return profile


def component_precision(component: str, vae_precision: str, bundle: Bundle) -> str:
    """fp16 everywhere but the VAE, whose precision `vae_precision` picks; bf16 throughout a
    bf16 bundle ("auto"), whose graphs say what stays fp32.

    "auto" keeps fp32 where fp16 is known to overflow: the export measured it (the manifest
    entry carries a precision_note) or the family's VAE is known for it (SDXL, as diffusers'
    force_upcast says).
    """
    if bundle.components[component].precision == BF16:
        return BF16 if vae_precision == "auto" or component not in VAE_COMPONENTS else vae_precision
    if component not in VAE_COMPONENTS:
        return "fp16"
    if vae_precision != "auto":
        return vae_precision
    entry = bundle.manifest["components"].get(component, {})
    overflows = bool(entry.get("precision_note")) or bundle.manifest.get("family") == "sdxl"
    return "fp32" if overflows else "fp16"


def check_precision(component: str, onnx_precision: str, precision: str) -> None:
    """Refuse precisions the ONNX cannot give: fp16 or bf16 weights cannot become another
    type again, and bf16 engines come from bf16 ONNX only."""
    if precision not in (*PRECISIONS, BF16):
        raise UserError(
            f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}"
        )
    if onnx_precision == "fp16" and precision == "fp32":
        raise UserError(
            f"{component}.onnx is fp16 in this bundle, so it cannot give an fp32 engine; "
            "export the bundle with --dtype fp32 for that"
        )
    if (onnx_precision == BF16) != (precision == BF16):
        raise UserError(
            f"{component}.onnx is {onnx_precision} in this bundle, so it cannot give an engine "
            f"in {precision}; export the bundle with --dtype {precision} for that"
        )


def select_components(bundle: Bundle, names: Iterable[str] | None) -> list[str]:
    """The requested components in pipeline order; all the bundle has when none are named."""
    if names is None:
        return [c for c in COMPONENTS if c in bundle.components]
    wanted = list(names)
    unknown = [n for n in wanted if n not in bundle.components]
    if unknown:
        raise UserError(
            f"the bundle has no {', '.join(unknown)}; choose from {', '.join(bundle.components)}"
        )
    return [c for c in COMPONENTS if c in wanted]


def engine_spec(
    bundle: Bundle,
    sizes: SizeRanges,
    env: Environment,
    components: Sequence[str],
    vae_precision: str,
    builder: Mapping[str, Any],
    max_loras: int = DEFAULT_MAX_LORAS,
) -> EngineSpec:
    """What the engines for these components will be, before any is built."""
    if vae_precision not in VAE_PRECISIONS:
        raise UserError(
            f"VAE precision {vae_precision!r} is unknown; choose one of {', '.join(VAE_PRECISIONS)}"
        )
    vae_scale = int(bundle.manifest["vae_scale_factor"])
    if not family_for(bundle.manifest).classifier_free:  # Flux: one row per image, always
        sizes = replace(sizes, guidance="none")
    specs = {}
    for name in components:
        info = bundle.components[name]
        precision = component_precision(name, vae_precision, bundle)
        check_precision(name, info.precision, precision)
        dims = {
            **component_dims(name, sizes, vae_scale),
            **lora_dims(bundle.manifest.get("lora_branch"), max_loras),
        }
        profile = component_profile(info, dims)
        specs[name] = ComponentSpec(precision, info.sha256, profile)
    return EngineSpec(env, sizes, specs, dict(builder))


# ---- building -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildJob:
    component: str
    onnx_path: Path
    onnx_precision: str
    precision: str
    profile: Profile
    bundle: Bundle  # calibration inputs (prompts, text encoders) when converted to fp16
    workdir: Path  # inside the staging directory: scratch files die with a failed build


@dataclass(frozen=True)
class BuiltEngine:
    data: bytes | memoryview
    fp16_source: str | None  # where the fp16 types came from; None for an fp32 engine


EngineBuilder = Callable[[BuildJob], BuiltEngine]


def write_engines(
    bundle: Bundle, spec: EngineSpec, build: EngineBuilder, *, force: bool = False, log: Log
) -> Path:
    """Build every engine of `spec` into BUNDLE/engines/<key>, or reuse a complete one there."""
    final = engine_dir(bundle.root, spec)
    if final.exists() and not force:
        reason = _reuse_problem(final, spec)
        if reason is None:
            log(f"engines already built: {final}")
            return final
        log(f"rebuilding {final.name}: {reason}")
    log(f"building into {final}")
    total = len(spec.components)
    written: dict[str, int] = {}
    fp16_sources: dict[str, str] = {}
    with staged_directory(final) as staging:
        for index, (name, component) in enumerate(spec.components.items(), 1):
            step = f"[{index}/{total}] {name}"
            log(f"{step}: building {component.precision} engine ...")
            start = time.perf_counter()
            info = bundle.components[name]
            job = BuildJob(
                name,
                bundle.path(name),
                info.precision,
                component.precision,
                component.profile,
                bundle,
                staging,
            )
            built = build(job)
            write_atomic(staging / f"{name}{ENGINE_SUFFIX}", built.data)
            written[name] = memoryview(built.data).nbytes
            if built.fp16_source is not None:
                fp16_sources[name] = built.fp16_source
            log(
                f"{step}: done in {time.perf_counter() - start:.1f} s "
                f"({written[name] / 2**20:.1f} MiB)"
                + (f"; fp16: {built.fp16_source}" if built.fp16_source else "")
            )
        record = json.dumps(record_json(spec, written, fp16_sources), indent=2) + "\n"
        write_atomic(staging / RECORD, record.encode())
    return final


def _reuse_problem(directory: Path, spec: EngineSpec) -> str | None:
    """Why the engines already in `directory` cannot stand for `spec`, or None if they can."""
    try:
        entry = read_entry(directory)
    except UserError as err:
        return str(err)
    if entry.spec != spec:
        return "its engine.json records a different build"
    problems = entry_problems(entry)
    return "; ".join(problems) if problems else None


def check_builder_options(optimization_level: int, workspace_gb: float | None) -> None:
    if not 0 <= optimization_level <= MAX_OPTIMIZATION_LEVEL:
        raise UserError(
            f"optimization level {optimization_level} is outside 0-{MAX_OPTIMIZATION_LEVEL}"
        )
    if workspace_gb is not None and workspace_gb <= 0:
        raise UserError(f"workspace must be a positive number of GiB, got {workspace_gb}")


def default_timing_cache(bundle_root: Path, env: Environment) -> Path:
    """Beside the engines, one per backend version and GPU architecture (what TensorRT checks)."""
    return bundle_root / ENGINES_DIR / f"{environment_tag(env)}.timing-cache"


class TensorRTBuilder:
    """Builds one serialized engine per job, with one builder and one timing cache throughout."""

    def __init__(
        self,
        trt_api: TensorRT,
        *,
        timing_cache: Path | None,
        workspace_gb: float | None,
        optimization_level: int,
        log: Log,
    ) -> None:
        check_builder_options(optimization_level, workspace_gb)
        self.trt = trt_api
        self.builder = trt_api.module.Builder(trt_logger(trt_api))
        self.workspace_gb = workspace_gb
        self.optimization_level = optimization_level
        self.log = log
        # TensorRT-RTX ignores timing caches and would need a GPU at build time for them.
        self.timing_cache = None if trt_api.backend == "tensorrt-rtx" else timing_cache
        if timing_cache is not None and self.timing_cache is None:
            log("TensorRT-RTX does not use timing caches; building without one")
        self.cache_bytes = b""
        if self.timing_cache is not None and self.timing_cache.is_file():
            self.cache_bytes = self.timing_cache.read_bytes()
            log(f"timing cache: {self.timing_cache} ({len(self.cache_bytes) / 2**10:.0f} KiB)")

    def __call__(self, job: BuildJob) -> BuiltEngine:
        if job.precision != "fp16":
            return BuiltEngine(self._build(job, job.onnx_path), None)
        if job.onnx_precision == "fp16":
            return BuiltEngine(self._build(job, job.onnx_path), FP16_FROM_BUNDLE)
        with tempfile.TemporaryDirectory(prefix=f".{job.component}-fp16-", dir=job.workdir) as tmp:
            self.log(
                f"converting {job.onnx_path.name} to fp16, keeping in fp32 the timestep "
                "embedding and the nodes whose measured values leave the fp16 range"
            )
            feeds = calibration_feeds(job.bundle, job.component, job.profile)
            onnx_path, kept = write_fp16_onnx(job.onnx_path, feeds, Path(tmp))
            data = self._build(job, onnx_path)
        return BuiltEngine(data, f"converted at build time, {kept} nodes kept fp32")

    def _build(self, job: BuildJob, onnx_path: Path) -> bytes | memoryview:
        """One serialized engine from `onnx_path`, strongly typed: the ONNX's types are kept
        (TensorRT 11 is strongly typed whatever the flag says)."""
        trt = self.trt.module
        logger = trt_logger(self.trt)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = self.builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        unknown = [name for name in inputs if name not in job.profile]
        if unknown:
            raise UserError(
                f"{onnx_path} has input(s) {', '.join(unknown)} that its manifest entry "
                "does not list; re-export the bundle"
            )
        config = self.builder.create_builder_config()
        if self.workspace_gb is not None:
            config.set_memory_pool_limit(
                trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * 2**30)
            )
        if hasattr(config, "builder_optimization_level"):
            config.builder_optimization_level = self.optimization_level
        if self.timing_cache is not None:
            cache = config.create_timing_cache(self.cache_bytes)
            if not config.set_timing_cache(cache, False):
                self.log(f"{self.timing_cache} is from another TensorRT or GPU; starting anew")
                config.set_timing_cache(config.create_timing_cache(b""), False)
        profile = self.builder.create_optimization_profile()
        for name in inputs:
            shapes = job.profile[name]
            profile.set_shape(
                name,
                trt.Dims(list(shapes.min)),
                trt.Dims(list(shapes.opt)),
                trt.Dims(list(shapes.max)),
            )
        config.add_optimization_profile(profile)
        serialized = self.builder.build_serialized_network(network, config)
        if serialized is None:
            raise UserError(
                f"TensorRT could not build {job.component} (see its log above); try a smaller "
                "maximum size or batch, or more --workspace"
            )
        if self.timing_cache is not None:
            self.cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
            self.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.timing_cache, self.cache_bytes)
        return memoryview(serialized)


# TensorRT-RTX 1.7 loads engines on compute capability 8.0, 8.6, 8.9, 12.0 and 12.1 only: on an
# H100 it built an engine, then deserialize_cuda_engine refused it. Data-centre Hopper and
# Blackwell (9.x, 10.x) need TensorRT itself.
RTX_REFUSED_MAJORS = ("9", "10")


def check_rtx_runs_here(env: Environment, driver_major: int) -> None:
    """Refuse TensorRT-RTX before a build whose engines it would then refuse to run."""
    major = env.compute_capability.split(".")[0]
    if env.backend == "tensorrt-rtx" and major in RTX_REFUSED_MAJORS:
        extra = f"tensorrt-cu{driver_major}" if driver_major in CUDA_EXTRAS else "tensorrt-cu13"
        raise UserError(
            f"TensorRT-RTX builds engines for {env.gpu_name} (compute capability "
            f"{env.compute_capability}) that it then refuses to run; install TensorRT for this "
            f"driver instead, `pip install 'sdrt[{extra}]'`"
        )


def build_engines(
    bundle_dir: str | Path,
    *,
    batch: tuple[int, int] = DEFAULT_BATCH,
    height: tuple[int, int] = DEFAULT_HEIGHT,
    width: tuple[int, int] = DEFAULT_WIDTH,
    opt: tuple[int, int] | None = None,
    static: tuple[int, int] | None = None,
    opt_batch: int | None = None,
    guidance: str = "cfg",
    vae_precision: str = "auto",
    timing_cache: str | Path | None = None,
    workspace_gb: float | None = None,
    optimization_level: int = 3,
    components: Iterable[str] | None = None,
    device: str = "auto",
    tensorrt_module: str | None = None,
    force: bool = False,
    progress: bool = True,
    max_loras: int = DEFAULT_MAX_LORAS,
) -> Path:
    """Build (or reuse) engines for `bundle_dir` on this GPU; returns BUNDLE/engines/<key>.

    opt: HEIGHTxWIDTH TensorRT tunes for (default 512x512 clamped into the ranges);
    static: one HEIGHTxWIDTH for min, opt and max; opt_batch: default the minimum batch;
    vae_precision: auto (fp32 where the bundle or family says fp16 overflows), fp16 or fp32;
    timing_cache: default BUNDLE/engines/<backend>-<version>-sm<XY>.timing-cache;
    max_loras: the largest run-time LoRA pool the engines take (bundles with --lora-rank).
    """
    log: Log = (lambda line: print(line, flush=True)) if progress else (lambda line: None)
    bundle = Bundle.load(bundle_dir)
    ort_only = [
        flag
        for flag, key in (
            ("--fused-attention", "fused_attention"),
            ("--cuda-fusions", "cuda_fusions"),
        )
        if bundle.manifest.get(key)
    ]
    if ort_only:
        raise UserError(
            f"{bundle.root} was exported with {' and '.join(ort_only)} (ONNX Runtime contrib "
            "ops), which TensorRT cannot parse; export it again without them"
        )
    sizes = size_ranges(
        batch=batch,
        height=height,
        width=width,
        opt=opt,
        static=static,
        opt_batch=opt_batch,
        guidance=guidance,
        size_multiple=int(bundle.manifest.get("size_multiple", 8)),
    )
    names = select_components(bundle, components)
    check_builder_options(optimization_level, workspace_gb)
    trt_api = import_tensorrt(tensorrt_module)
    cudart = import_cudart()
    env = current_environment(trt_api, shared_device(cudart, cuda_device_index(device)))
    log(f"{trt_api.describe()} on {env.gpu_name} (compute capability {env.compute_capability})")
    check_rtx_runs_here(env, driver_cuda_major(cudart))
    options = {"optimization_level": optimization_level, "workspace_gb": workspace_gb}
    spec = engine_spec(bundle, sizes, env, names, vae_precision, options, max_loras)
    log(f"engine key {cache_key(spec)}")
    builder = TensorRTBuilder(
        trt_api,
        timing_cache=Path(timing_cache) if timing_cache else default_timing_cache(bundle.root, env),
        workspace_gb=workspace_gb,
        optimization_level=optimization_level,
        log=log,
    )
    return write_engines(bundle, spec, builder, force=force, log=log)
