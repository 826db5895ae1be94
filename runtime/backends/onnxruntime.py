"""ONNX Runtime backend: CPU provider everywhere, CUDA provider when onnxruntime-gpu has it.

Every call runs through IO binding, on the CPU as on CUDA. Feeds are numpy arrays or device
values (`ort.OrtValue`) from `run_on_device` or `to_device`; a device value is bound where it
lies, so the prompt embeddings the text encoder leaves on the GPU are read there by every
U-Net step.

Where a bundle ships a static-shape copy of a graph for the requested sizes (manifest
`static_variants`), the CUDA provider runs that copy with CUDA graph capture: its inputs and
outputs are fixed device buffers, refilled each call and replayed as one graph launch.

What crosses between host and device per U-Net step, on CUDA:
- `sample` (B x 4 x h x w float32) and `timestep` (B floats) host -> device: the scheduler
  and guidance arithmetic are numpy.
- `noise_pred` (B x 4 x h x w float32) device -> host, for the same reason.
- `encoder_hidden_states` (and SDXL's other fixed conditioning): uploaded once per request by
  `to_device`, then fed as that device value. On the CUDA graph path it is copied into the
  graph's buffer at the first step only: the runner remembers which constant each buffer holds
  (`OrtValue.update_inplace` from a device value copies device to device; ORT builds without
  that copy go through the host, once per request).
On the CPU every value is host memory and nothing is transferred.

Sessions are made when first needed: with static variants in use, the dynamic-shape session
(the model's weights on the device a second time) exists only once a request has a size no
variant fixes. Each session created is logged at DEBUG on the "sdrt" logger.

ONNX Runtime's graph optimizer runs once per graph, provider and machine: its result is kept in
the graph cache (`sdrt.graph_cache`, on by default) and later sessions load it with the
optimizer off, which gives the same outputs bit for bit (tests/test_graph_cache.py).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import graph_cache as cache
from ..bundle import Bundle, HashCheck, variant_info
from ..errors import UserError
from .base import io_table, parse_device

log = logging.getLogger("sdrt")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
STATIC_SHAPES = ("auto", "always", "never")
# how ORT names an op no provider has a kernel for ("... for Conv(11) node with name '...'")
MISSING_KERNEL = re.compile(r"Could not find an implementation for (\S+) node")
FLAVOURS = ("onnxruntime", "onnxruntime-gpu")  # both install the `onnxruntime` package
GPU_INSTALL = (
    "`pip install 'sdrt[cuda13]'` (CUDA 13 driver; 'sdrt[cuda12]' for CUDA 12, see README)"
)


def installed_flavours(
    distributions: Callable[[], Iterable[Any]] = importlib.metadata.distributions,
) -> list[tuple[str, str, Path]]:
    """The ONNX Runtime distributions installed: (name, version, the folder it installed its
    `onnxruntime` package into)."""
    found = []
    for dist in distributions():
        name = str(dist.metadata["Name"] or "").lower()
        if name in FLAVOURS:
            found.append((name, dist.version, Path(dist.locate_file("onnxruntime")).resolve()))
    return found


def check_one_flavour(found: Iterable[tuple[str, str, Path]]) -> None:
    """Refuse two flavours installed into one folder: they overwrite each other's files, and
    which provider then loads depends on install order (microsoft/onnxruntime#26996). One
    shadowing another from an earlier `sys.path` entry is fine: it is the one imported."""
    by_folder: dict[Path, dict[str, str]] = {}
    for name, version, folder in found:
        by_folder.setdefault(folder, {})[name] = version
    for folder, names in by_folder.items():
        if len(names) > 1:
            listed = " and ".join(f"{name}=={version}" for name, version in sorted(names.items()))
            gpu = names["onnxruntime-gpu"]
            raise UserError(
                f"{listed} are both installed in {folder.parent} and overwrite each other's "
                "files; run `pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                f"onnxruntime-gpu=={gpu}` (or, for the CPU build, `pip uninstall -y onnxruntime "
                "onnxruntime-gpu && pip install 'sdrt[cpu]'`)"
            )


if importlib.util.find_spec("onnxruntime") is None:  # `pip install sdrt` without an extra
    raise ImportError("onnxruntime is not installed", name="onnxruntime")
check_one_flavour(installed_flavours())


def providers_for(device: str) -> list[str]:
    """Execution providers for `device` (auto, cpu, cuda or cuda:N), failing clearly when the
    CUDA provider is asked for and absent; an unknown name is refused, never run on the CPU.
    "auto" takes the CUDA provider only where it can start here, else the CPU with a warning."""
    import onnxruntime as ort

    kind = parse_device(device).kind
    if kind == "cpu":
        return [CPU]
    if CUDA in ort.get_available_providers():
        preload_cuda_libraries()
        if kind == "cuda" or auto_takes_cuda():
            return [CUDA, CPU]
        return [CPU]
    if kind == "cuda":
        raise UserError(
            f"device {device!r} needs onnxruntime-gpu, and this is the CPU build; run "
            f"`pip uninstall -y onnxruntime` then {GPU_INSTALL}, or use --device cpu"
        )
    return [CPU]


LIBRARIES_HINT = (
    "onnxruntime-gpu finds them in the nvidia-* wheels of its [cuda,cudnn] extras, which "
    f"{GPU_INSTALL} installs"
)


@functools.cache
def preload_cuda_libraries() -> None:
    """Load the CUDA runtime, cuBLAS, cuDNN and cuRAND from the nvidia-* wheels before the first
    CUDA session. The CUDA provider's library has no RPATH: without this, a process that has not
    imported torch (which loads them) finds none of them. onnxruntime-gpu has `preload_dlls`
    from 1.21 on; it prints what it fails to load and leaves the rest to the session check."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


# An ONNX model (IR 8) whose one node is Identity (float [1] -> float [1]), opset 17: the smallest
# graph a provider can be asked to run. tests/test_onnxruntime_backend.py rebuilds it with onnx.
PROBE_MODEL = bytes.fromhex(
    "08083a3b0a100a017812017922084964656e74697479120570726f62655a0f0a0178120a0a08080112040a"
    "020801620f0a0179120a0a08080112040a02080142040a001011"
)


@functools.cache
def auto_takes_cuda() -> bool:
    """Whether "auto" runs on the CUDA provider; where it cannot start, one warning per process
    says so and the CPU runs instead."""
    if cuda_provider_starts():
        return True
    warnings.warn(
        f"--device auto: onnxruntime-gpu is installed but its {CUDA} cannot start here (its "
        f"CUDA, cuBLAS or cuDNN libraries are missing, or there is no GPU); running on the CPU. "
        f"{LIBRARIES_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


@functools.cache
def cuda_provider_starts() -> bool:
    """Whether a session asked for the CUDA provider gets it in this process: ORT lists the
    provider whenever onnxruntime-gpu is installed, and falls back to the CPU when the provider
    cannot load its libraries or find a GPU."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(PROBE_MODEL, session_options(), providers=[CUDA, CPU])
    except Exception:  # noqa: BLE001 - a provider that cannot start, whatever ORT raises
        return False
    return CUDA in session.get_providers()


@dataclass(frozen=True)
class CudaOptions:
    """CUDA provider settings; each is a lever to measure, not a known best.

    cudnn_conv_algo_search: EXHAUSTIVE times every cuDNN algorithm once per shape (slow first
    call, fastest after); HEURISTIC starts faster. arena_extend_strategy: kSameAsRequested
    grows the memory arena by what is asked, not to the next power of two, which matters when
    a dynamic and several static sessions of one model share the GPU. prefer_nhwc: let ORT run
    convolutions channels-last (off until measured on a graph exported for it).
    """

    device_id: int = 0  # the engine sets it from its device ("cuda:N" -> N)
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    arena_extend_strategy: str = "kSameAsRequested"
    prefer_nhwc: bool = False


def cuda_provider_options(options: CudaOptions, cuda_graph: bool) -> dict[str, str]:
    """The CUDA provider's option strings; keys off by default are left out, so an ORT build
    that predates them still accepts the rest."""
    values = {
        "device_id": str(options.device_id),
        "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
        "arena_extend_strategy": options.arena_extend_strategy,
    }
    if options.prefer_nhwc:
        values["prefer_nhwc"] = "1"
    if cuda_graph:
        values["enable_cuda_graph"] = "1"
    return values


def session_providers(
    providers: Sequence[str], options: CudaOptions, cuda_graph: bool = False
) -> list[Any]:
    """`providers` with the CUDA provider's options attached, as InferenceSession takes them."""
    return [(p, cuda_provider_options(options, cuda_graph)) if p == CUDA else p for p in providers]


@dataclass(frozen=True)
class StaticVariant:
    """A copy of a component's graph with every named dimension fixed to `dims`."""

    path: Path
    dims: dict[str, int]
    # its graph's hash check, then its component's (whose weights it may share): what a graph
    # cache entry made from it is keyed by and checked against
    sources: tuple[HashCheck, ...] = ()


def static_variants(bundle: Bundle, component: str) -> list[StaticVariant]:
    """The manifest's static variants of `component`, each checked to exist."""
    entries = bundle.manifest["components"][component].get("static_variants") or []
    info = bundle.components[component]
    variants = []
    for entry in entries:
        try:
            variant = StaticVariant(
                bundle.root / entry["file"],
                {k: int(v) for k, v in entry["dims"].items()},
                (bundle.source_check(variant_info(info, entry)), bundle.source_check(info)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(
                f"manifest entry for a static variant of {component} is malformed ({err!r}); "
                "re-export the bundle"
            ) from err
        if not variant.path.is_file():
            raise UserError(f"{variant.path} is missing from the bundle; re-export it")
        variants.append(variant)
    return variants


def resolve_dims(
    specs: Mapping[str, tuple[str, list[Any]]], shapes: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """Sizes of the named dimensions, read from the feeds' shapes and checked for agreement."""
    dims: dict[str, int] = {}
    seen_in: dict[str, str] = {}
    for name, (_, spec) in specs.items():
        shape = tuple(shapes[name])
        if len(shape) != len(spec):
            raise UserError(f"input {name} has shape {shape}, expected rank {len(spec)} ({spec})")
        for size, dim in zip(shape, spec, strict=True):
            if isinstance(dim, str):
                if dims.setdefault(dim, size) != size:
                    raise UserError(
                        f"input {name} has {dim}={size} but {seen_in[dim]} has "
                        f"{dim}={dims[dim]}; feed inputs of matching sizes"
                    )
                seen_in.setdefault(dim, name)
            elif size != dim:
                raise UserError(f"input {name} has shape {shape}, expected {spec}")
    return dims


def match_static_variant(
    variants: Sequence[StaticVariant], dims: Mapping[str, int]
) -> StaticVariant | None:
    """The variant fixed to exactly these sizes; it must fix every dimension the feeds name."""
    for variant in variants:
        if all(variant.dims.get(name) == size for name, size in dims.items()):
            return variant
    return None


def use_static_variants(policy: str, provider: str) -> bool:
    """Static copies pay off where a CUDA graph can be captured, so "auto" uses them on the
    CUDA provider only; "always" also on the CPU (shape arithmetic folded), "never" nowhere."""
    if policy not in STATIC_SHAPES:
        raise UserError(f"static_shapes must be one of {', '.join(STATIC_SHAPES)}, got {policy!r}")
    return policy == "always" or (policy == "auto" and provider == CUDA)


def cuda_graph_usable(provider: str, cuda_graph: bool, variant: StaticVariant | None) -> bool:
    """ORT captures a CUDA graph only for a graph whose shapes are all static, on CUDA."""
    return cuda_graph and provider == CUDA and variant is not None


class OnnxRuntimeEngine:
    """One component: one fixed-buffer session per static variant in use, plus a dynamic-shape
    session for other sizes, made when first needed. Not safe to call from several threads at
    once on the static path."""

    def __init__(
        self,
        bundle: Bundle,
        component: str,
        device: str = "auto",
        *,
        static_shapes: str = "auto",
        cuda_graph: bool = True,
        cuda_options: CudaOptions | None = None,
        graph_cache: str | Path | bool | None = True,
        threads: int | None = None,
    ) -> None:
        """`graph_cache`: folder of optimized graphs (True: `sdrt.graph_cache.default_cache_dir()`;
        None, False or "off": optimize at every load). `threads`: ONNX Runtime's intra-op
        threads per session (default: one per physical core)."""
        info = bundle.components[component]
        self.component = component
        self.precision = info.precision
        self.inputs = io_table(info.inputs)
        self.outputs = io_table(info.outputs)
        self.cuda_graph = cuda_graph
        self._path = bundle.path(component)
        self._sources = (bundle.source_check(info),)
        self.graph_cache = cache.cache_dir_option(graph_cache)
        self.threads = threads
        # graph file name -> how its session got its graph: "hit" (from the cache), "stored"
        # (optimized now and cached), "rebuilt" (a cached copy failed its check), "off"/"failed"
        self.graph_cache_status: dict[str, str] = {}
        self._providers = providers_for(device)
        if info.cuda_only_ops and CUDA not in self._providers:
            raise UserError(
                f"{self._path} holds ONNX Runtime ops that only its CUDA provider "
                f"runs ({', '.join(info.cuda_only_ops)}; exported with --cuda-fusions); run it "
                "with --device cuda and onnxruntime-gpu, or export without --cuda-fusions"
            )
        if info.precision == "bf16" and CUDA not in self._providers:
            raise UserError(
                f"{self._path} is bf16, which ONNX Runtime's CPU provider cannot run (it has no "
                "bf16 MatMul, Add or Mul); run it with --device cuda and onnxruntime-gpu or with "
                "TensorRT, or export the bundle with --dtype fp32 for the CPU"
            )
        self.provider = self._providers[0]
        self.device_type = "cuda" if self.provider == CUDA else "cpu"
        self.device_id = parse_device(device).index if self.device_type == "cuda" else 0
        self.cuda_options = replace(cuda_options or CudaOptions(), device_id=self.device_id)
        variants = static_variants(bundle, component)
        self.variants = variants if use_static_variants(static_shapes, self.provider) else []
        self._static: dict[Path, StaticRunner | None] = {}
        self._session: Any = None
        # Device values made by `to_device`: fixed for a request, so a static runner that
        # holds one in its buffer need not copy it again.
        self._constants: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._session_lock = threading.Lock()
        self.bound: dict[str, Any] = {}  # inputs fed on every call (`bind_banks`)
        if not self.variants:
            _ = self.session  # every call needs it: load errors surface at load

    @property
    def session(self) -> Any:
        """The dynamic-shape session, created at first use."""
        with self._session_lock:
            if self._session is None:
                self._session = create_session(
                    self._path,
                    session_providers(self._providers, self.cuda_options),
                    self,
                    self._sources,
                )
            return self._session

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Named numpy arrays (or device values) in, named host numpy arrays out."""
        feeds = {**self.bound, **feeds}
        runner = self.static_runner(feeds)
        if runner is not None:
            with self._lock:
                values = runner.run(feeds, self._constants)
                # On the CPU, OrtValue.numpy() is a view of a buffer the next call overwrites.
                return {k: to_host(values[k], copy=self.device_type == "cpu") for k in self.outputs}
        binding, _held = self._bind(feeds, output_device="cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu(), strict=True))

    def run_on_device(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Like `run`, but outputs stay where the engine runs, as `ort.OrtValue`s to feed the
        next engine. From a static variant they are its buffers, valid until the next call."""
        feeds = {**self.bound, **feeds}
        runner = self.static_runner(feeds)
        if runner is not None:
            with self._lock:
                values = runner.run(feeds, self._constants)
                return {k: values[k] for k in self.outputs}
        binding, _held = self._bind(feeds, output_device=self.device_type)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.get_outputs(), strict=True))

    def to_device(self, name: str, array: np.ndarray) -> Any:
        """Upload `array` once as a device value for input `name`, to feed it on every call of
        a loop (e.g. SDXL's embeddings, concatenated in numpy) without a copy per call. The
        value is a constant: do not change it in place (feed a new one instead)."""
        dtype = self.inputs[name][0]
        value = to_device_value(
            np.ascontiguousarray(array, dtype=dtype), self.device_type, self.device_id
        )
        self._constants.add(value)
        return value

    def bind_banks(self, banks: Mapping[str, np.ndarray]) -> Callable[[str, slice], None]:
        """Bind `banks` (input name -> host array, the LoRA adapter pool) as inputs of every
        call from now on; returns `changed(name, rows)`, to call after writing rows of a bank.

        On the CPU the OrtValue shares the array's memory: a write is the in-place update and
        `changed` has nothing to do. On CUDA each bank is a device OrtValue refilled from its
        host array (onnxruntime's Python API copies whole values, not row ranges)."""
        import onnxruntime as ort

        values = {
            name: ort.OrtValue.ortvalue_from_numpy(array, self.device_type, self.device_id)
            for name, array in banks.items()
        }
        self.bound = {**self.bound, **values}
        if self.device_type == "cpu":
            return lambda name, rows: None
        return lambda name, rows: values[name].update_inplace(banks[name])

    def static_runner(self, feeds: Mapping[str, Any]) -> StaticRunner | None:
        """The fixed-buffer runner for these feeds' sizes, or None to use the dynamic graph."""
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise UserError(f"{self.component} needs inputs {', '.join(missing)}; feed them")
        if not self.variants:
            return None
        dims = resolve_dims(self.inputs, {name: shape_of(feeds[name]) for name in self.inputs})
        variant = match_static_variant(self.variants, dims)
        return None if variant is None else self._static_for(variant)

    def preload(self) -> None:
        """Load every static variant now rather than at the first request of its size, so a
        server pays session creation at start-up (capture still happens on first use)."""
        for variant in self.variants:
            self._static_for(variant)

    def _static_for(self, variant: StaticVariant) -> StaticRunner | None:
        with self._lock:
            if variant.path not in self._static:
                self._static[variant.path] = self._load_static(variant)
            return self._static[variant.path]

    def _load_static(self, variant: StaticVariant) -> StaticRunner | None:
        graph = cuda_graph_usable(self.provider, self.cuda_graph, variant)
        try:
            session = create_session(
                variant.path,
                session_providers(self._providers, self.cuda_options, cuda_graph=graph),
                self,
                variant.sources,
            )
            return StaticRunner(session, self.inputs, self.device_type, self.device_id)
        except Exception as err:  # noqa: BLE001 - the dynamic graph computes the same thing
            warnings.warn(
                f"{self.component}: static variant {variant.path.name} could not be loaded "
                f"({err}); using the dynamic-shape graph for sizes {variant.dims}",
                RuntimeWarning,
                stacklevel=4,
            )
            return None

    def _bind(self, feeds: Mapping[str, Any], output_device: str) -> tuple[Any, list[Any]]:
        """An IO binding for one call, and the host arrays it points at, which the caller
        holds until the run is over."""
        binding = self.session.io_binding()
        held = []
        for name, (dtype, _) in self.inputs.items():
            value = feeds[name]
            if is_device_value(value):
                binding.bind_ortvalue_input(name, value)
            else:
                held.append(np.ascontiguousarray(value, dtype=dtype))
                binding.bind_cpu_input(name, held[-1])
        device_id = self.device_id if output_device != "cpu" else 0
        for name in self.outputs:
            binding.bind_output(name, output_device, device_id)
        return binding, held


class StaticRunner:
    """A session over a static-shape graph whose inputs and outputs are bound once to fixed
    buffers: what CUDA graph replay requires, since a replay reads and writes the addresses
    seen at capture. Each call copies the feeds into the input buffers, except a constant
    device value (from `to_device`) that a buffer already holds."""

    def __init__(
        self,
        session: Any,
        specs: Mapping[str, tuple[str, list[Any]]],
        device_type: str,
        device_id: int,
    ) -> None:
        self.session = session
        self.binding = self.session.io_binding()
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        for arg in self.session.get_inputs():
            self.inputs[arg.name] = self._buffer(arg, specs[arg.name][0], device_type, device_id)
            self.binding.bind_ortvalue_input(arg.name, self.inputs[arg.name])
        for arg in self.session.get_outputs():
            self.outputs[arg.name] = self._buffer(arg, arg.type, device_type, device_id)
            self.binding.bind_ortvalue_output(arg.name, self.outputs[arg.name])
        self.dtypes = {name: specs[name][0] for name in self.inputs}
        self.holding: dict[str, Any] = {}  # input name -> the constant its buffer holds

    @staticmethod
    def _buffer(arg: Any, dtype: str, device_type: str, device_id: int) -> Any:
        import onnxruntime as ort

        if not all(isinstance(d, int) for d in arg.shape):
            raise ValueError(f"{arg.name} has shape {arg.shape}, not static")
        return ort.OrtValue.ortvalue_from_shape_and_type(
            arg.shape, numpy_dtype(dtype), device_type, device_id
        )

    def run(self, feeds: Mapping[str, Any], constants: Container[Any] = ()) -> dict[str, Any]:
        """Refill the input buffers from `feeds` and run; values in `constants` are copied
        only when the buffer does not hold them already."""
        for name, buffer in self.inputs.items():
            value = feeds[name]
            if self.holding.get(name) is value:
                continue
            self.holding.pop(name, None)
            if is_device_value(value):
                copy_value(value, buffer)
                if value in constants:
                    self.holding[name] = value
            else:
                buffer.update_inplace(np.ascontiguousarray(value, dtype=self.dtypes[name]))
        self.session.run_with_iobinding(self.binding)
        return dict(self.outputs)


def create_session(
    path: Path, providers: list[Any], engine: OnnxRuntimeEngine, sources: Sequence[HashCheck]
) -> Any:
    """An InferenceSession for `path` (through the engine's graph cache), logged: which graphs
    hold weights on the device is what decides memory, so a debug log of `Pipeline.load` and
    of each request shows it."""
    wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    try:
        session, status = cached_session(
            path, providers, engine.graph_cache, sources, engine.threads
        )
    except Exception as err:
        # ORT's CUDA provider has bf16 kernels for some ops only (MatMul, Gemm, the
        # elementwise ones, Softmax, LayerNormalization); one it lacks fails the whole session
        missing = MISSING_KERNEL.search(str(err))
        if engine.precision != "bf16" or missing is None:
            raise
        raise UserError(
            f"{path.name} is bf16 and ONNX Runtime has no bf16 kernel for {missing[1]} on "
            f"{wanted}; build TensorRT engines for this bundle (`sdrt build`), or export it "
            "with --dtype fp16"
        ) from err
    engine.graph_cache_status[path.name] = status
    if wanted not in session.get_providers():
        # ORT falls back to the CPU when the CUDA provider cannot load its libraries, and
        # buffers allocated on the GPU would then feed a CPU session: never run on silently.
        raise UserError(
            f"{path.name}: ONNX Runtime could not start {wanted} (the session has only "
            f"{', '.join(session.get_providers())}): the CUDA runtime, cuBLAS, cuDNN or cuRAND "
            f"library it loads was not found (the lines above name it); {LIBRARIES_HINT}, "
            "or use --device cpu"
        )
    log.debug(
        "%s: created a session for %s on %s (device %s, graph cache: %s)",
        engine.component,
        path.name,
        session.get_providers()[0],
        engine.device_id,
        status,
    )
    return session


def cached_session(
    path: Path,
    providers: list[Any],
    cache_dir: Path | None,
    sources: Sequence[HashCheck],
    threads: int | None,
) -> tuple[Any, str]:
    """A session for `path` and how it got its graph (see `graph_cache_status`): from a cached
    optimized copy whose files still match their record, else optimized now and stored. A
    cache that cannot be written costs the speed-up, never the load.

    An entry is keyed by the manifest's sha256 of the graph it was made from (`sources`), and
    committed only after those files are checked against it: a changed file must not leave an
    entry that a later load of the genuine bundle would use."""
    import onnxruntime as ort

    if cache_dir is None:
        return ort.InferenceSession(str(path), session_options(threads), providers=providers), "off"
    key = graph_key("+".join(check.sha256 for check in sources), providers)
    entry = cache.lookup(cache_dir, key)
    status = "stored"
    if entry is not None:
        session = session_from_cache(entry, providers, threads)
        if session is not None:
            return session, "hit"
        log.warning("graph cache: %s no longer matches its record; rebuilding it", entry.model)
        cache.discard(entry.model.parent)
        status = "rebuilt"
    made: list[Any] = []

    def optimize_into(target: Path) -> None:
        options = session_options(threads)
        options.optimized_model_filepath = str(target)
        options.add_session_config_entry(EXTERNAL_WEIGHTS, cache.WEIGHTS)
        options.add_session_config_entry(EXTERNAL_MIN_BYTES, "1024")
        made.append(ort.InferenceSession(str(path), options, providers=providers))
        if not target.is_file():
            raise OSError(f"ONNX Runtime wrote no optimized model to {target}")
        for check in sources:  # also with verify=False: the entry outlives this load
            check.run()

    try:
        cache.store(cache_dir, key, optimize_into)
    except Exception as err:  # noqa: BLE001 - e.g. a provider whose graphs ORT cannot save
        log.warning("graph cache: could not store the optimized %s (%s)", path.name, err)
        status = "failed"
    if made:
        return made[0], status
    # a graph ORT cannot load fails here again, with ORT's own message
    return ort.InferenceSession(str(path), session_options(threads), providers=providers), status


def session_from_cache(
    entry: cache.CachedGraph, providers: list[Any], threads: int | None
) -> Any | None:
    """A session over a cached optimized graph, with the optimizer off; None unless every
    file of the entry has the checksum it was written with. ORT reads the files while another
    thread hashes them: the session is dropped, unused, if the check fails."""
    import onnxruntime as ort

    options = session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with ThreadPoolExecutor(1, thread_name_prefix="sdrt-graph-check") as pool:
        checking = pool.submit(entry.verify)
        try:
            session = ort.InferenceSession(str(entry.model), options, providers=providers)
        except Exception:  # noqa: BLE001 - a damaged entry is rebuilt from the bundle's graph
            session = None
        intact = checking.result()
    return session if intact else None


# ONNX Runtime session config keys (onnxruntime_session_options_config_keys.h): where the
# optimized model's initializers go, relative to the model, and the size from which they do
EXTERNAL_WEIGHTS = "session.optimized_model_external_initializers_file_name"
EXTERNAL_MIN_BYTES = "session.optimized_model_external_initializers_min_size_in_bytes"


def graph_key(source_sha256: str, providers: list[Any]) -> cache.GraphKey:
    """The cache key of a graph optimized for these providers (with their options) on this
    machine by this ONNX Runtime, at ORT's default level (ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    first = providers[0]
    name, options = first if isinstance(first, tuple) else (first, {})
    # the CUDA graph flag and device index do not change the optimized graph
    shaping = {k: v for k, v in options.items() if k not in ("device_id", "enable_cuda_graph")}
    return cache.GraphKey(
        source_sha256=source_sha256,
        runtime=f"onnxruntime-{ort.__version__}",
        provider=name,
        host=cache.host_tag(),
        options=cache.key_options(
            {
                "level": "ORT_ENABLE_ALL",
                "providers": ",".join(p[0] if isinstance(p, tuple) else p for p in providers),
                **shaping,
            }
        ),
    )


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def is_device_value(value: Any) -> bool:
    import onnxruntime as ort

    return isinstance(value, ort.OrtValue)


def to_device_value(array: np.ndarray, device_type: str, device_id: int) -> Any:
    """An OrtValue holding a copy of `array` on the device (on the CPU, ORT would otherwise
    share the numpy memory, and a later change to the array would change the value)."""
    import onnxruntime as ort

    value = ort.OrtValue.ortvalue_from_shape_and_type(
        array.shape, array.dtype, device_type, device_id
    )
    value.update_inplace(array)
    return value


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(value.shape()) if is_device_value(value) else tuple(np.shape(value))


def to_host(value: Any, copy: bool = False) -> np.ndarray:
    """A host numpy array; `copy` where the value is a buffer the next call overwrites (on the
    CPU, OrtValue.numpy() is a view of it)."""
    array = value.numpy() if is_device_value(value) else np.asarray(value)
    return array.copy() if copy else array


def copy_value(src: Any, dst: Any) -> None:
    """Copy one OrtValue into another of the same shape, device to device where ORT can.

    onnxruntime 1.32's `OrtValue.update_inplace` takes an OrtValue and copies between devices
    (onnxruntime_inference_collection.py); older builds take numpy arrays only. Not
    `ort.copy_tensors`: it needs a data transfer registered for plugin execution providers,
    which a session made with providers=[...] does not register.
    """
    if tuple(src.shape()) != tuple(dst.shape()):
        raise UserError(f"device value has shape {src.shape()}, expected {dst.shape()}")
    try:
        dst.update_inplace(src)
    except TypeError:  # this ORT copies from numpy only: through the host
        dst.update_inplace(np.ascontiguousarray(src.numpy()))


def numpy_dtype(onnx_or_numpy: str) -> np.dtype:
    """numpy dtype from a manifest name (float32) or an ORT type string (tensor(float))."""
    names = {
        "tensor(float)": "float32",
        "tensor(float16)": "float16",
        "tensor(double)": "float64",
        "tensor(int32)": "int32",
        "tensor(int64)": "int64",
        "tensor(bool)": "bool",
    }
    return np.dtype(names.get(onnx_or_numpy, onnx_or_numpy))
