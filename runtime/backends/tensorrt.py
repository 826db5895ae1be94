"""TensorRT backend: serialized engines from BUNDLE/engines/, run with cuda-python, no torch.

The engine for this GPU is found through `sdrt.engine_cache`: only an engine whose engine.json
names this backend version, GPU, compute capability and the bundle's ONNX hash is used, and the
one whose shape profile covers the request is loaded (lazily, on the first request it covers).

What crosses between host and device on each `run`, so on every U-Net step:
- host -> device: every input given as a numpy array, copied into a pinned (page-locked) host
  buffer and from there, asynchronously, into a device buffer; both are kept per input shape.
  Inputs fixed over a loop are uploaded once instead: `to_device` (which the pipeline calls
  through `upload_constants`) returns a `DeviceTensor` that `run` binds by address, so for the
  U-Net only sample and timestep go up each step, not the text embeddings.
- device -> host: every output into its pinned buffer, one stream synchronize, then a copy into
  a new numpy array (U-Net: noise_pred). Guidance and the scheduler step run in numpy.
Weights, activations and TensorRT's scratch memory never leave the device. Keeping the latents
on the device across steps too needs an Engine interface that hands back device arrays.

Every call that allocates, frees, deserializes, captures or enqueues runs inside
`CudaDevice.active()`: the device's lock held and the device made current, since the current
device is per host thread and another engine may have switched it (`--device cuda:1`).

Device memory is shared: every engine on a GPU gets one execution context created with the
USER_MANAGED strategy and pointed at one scratch allocation sized to the largest
`device_memory_size_v2` among the engines loaded, so text encoder, U-Net and VAE do not each
hold their own. That is safe because they share one CUDA stream and `run` holds the device's
lock from the first copy until its outputs are on the host. Input/output buffers are allocated
per input shape and reused (the most recent few shapes are kept). With `cuda_graph=True` the
second request of a shape is captured into a CUDA graph and later ones replay it; a graph is
replayed only while the context is bound to the same addresses (shape buffers, DeviceTensors,
scratch) it was captured with.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from ..bundle import Bundle
from ..engine_cache import (
    ENGINES_DIR,
    EngineEntry,
    Environment,
    Profile,
    ShapeRange,
    profile_violation,
    select_entry,
    usable_entries,
)
from ..errors import UserError
from .base import io_table, parse_device

if TYPE_CHECKING:
    import tensorrt as trt

INSTALL_HINT = (
    "run `pip install 'sdrt[tensorrt-cu13]'`, or 'sdrt[tensorrt-cu12]' where `nvidia-smi` "
    "shows CUDA Version 12.x"
)
# Python module -> backend name recorded in engine keys. TensorRT-RTX ships its API under other
# module names; its engines differ from TensorRT's, so the backend name keeps them apart.
TENSORRT_MODULES = {
    "tensorrt": "tensorrt",
    "tensorrt_rtx": "tensorrt-rtx",
    "tensorrt_rtx_bindings": "tensorrt-rtx",
}
CUDA_EXTRAS = (12, 13)  # CUDA major versions with an sdrt[tensorrt-cuXX] extra
CUDART_MODULES = ("cuda.bindings.runtime", "cuda.cudart")  # cuda-python >= 12.6, then older
SHAPES_KEPT = 4  # input shapes whose device buffers (and CUDA graph) an engine keeps
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class TensorRTModule(Protocol):
    """The part of the TensorRT Python API sdrt uses, builder and runtime alike.

    TensorRT-RTX's module is used through the same names; `missing_api` says which of them a
    loaded module lacks, so an incompatible one fails with a list instead of mid-build.
    """

    Logger: type[trt.Logger]
    Runtime: type[trt.Runtime]
    Builder: type[trt.Builder]
    OnnxParser: type[trt.OnnxParser]
    BuilderFlag: type[trt.BuilderFlag]
    MemoryPoolType: type[trt.MemoryPoolType]
    NetworkDefinitionCreationFlag: type[trt.NetworkDefinitionCreationFlag]
    ExecutionContextAllocationStrategy: type[trt.ExecutionContextAllocationStrategy]
    TensorIOMode: type[trt.TensorIOMode]
    Dims: type[trt.Dims]


if TYPE_CHECKING:
    # Static proof that the real module offers everything the protocol names.
    _STUBS_OFFER_PROTOCOL: TensorRTModule = trt

REQUIRED_API = (*TensorRTModule.__annotations__, "__version__")


@dataclass(frozen=True)
class TensorRT:
    """An imported TensorRT (or TensorRT-RTX) module and the backend name engines record."""

    module: TensorRTModule
    backend: str
    module_name: str

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", "unknown"))

    def describe(self) -> str:
        return f"{self.backend} {self.version} (Python module {self.module_name})"


def import_tensorrt(prefer: str | None = None) -> TensorRT:
    """Import TensorRT, else TensorRT-RTX; say which modules were tried when none imports."""
    if prefer is not None and prefer not in TENSORRT_MODULES:
        raise UserError(
            f"unknown TensorRT module {prefer!r}; choose one of {', '.join(TENSORRT_MODULES)}"
        )
    names = [prefer] if prefer else list(TENSORRT_MODULES)
    failures = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name not in (name, None):
                failures.append(f"{name} is installed but needs {err.name}")
            continue
        except (ImportError, OSError) as err:
            failures.append(f"{name} is installed but failed to load ({err})")
            continue
        missing = missing_api(module)
        if (
            missing
            and isinstance(module, types.ModuleType)
            and getattr(module, "__file__", None) is None
        ):
            # A folder with no code: what type-stub packages such as tensorrt-stubs install.
            failures.append(f"{name} here is only type stubs, not the library")
            continue
        if missing:
            failures.append(f"{name} lacks {', '.join(missing)}")
            continue
        return TensorRT(cast(TensorRTModule, module), TENSORRT_MODULES[name], name)
    found = f" ({'; '.join(failures)})" if failures else ""
    raise UserError(
        f"the tensorrt backend needs TensorRT, which is not installed here{found}; {INSTALL_HINT}"
    )


def missing_api(module: object) -> list[str]:
    return [name for name in REQUIRED_API if not hasattr(module, name)]


@functools.cache
def trt_logger(trt_api: TensorRT) -> trt.Logger:
    """One logger per module: TensorRT expects the same logger for every builder and runtime."""
    return trt_api.module.Logger(trt_api.module.Logger.WARNING)


def import_cudart() -> Any:
    """cuda-python's runtime API. It ships no type information, hence `Any` and importlib."""
    for name in CUDART_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise UserError(
        f"the tensorrt backend needs cuda-python, which is not installed here; {INSTALL_HINT}"
    )


def cuda_device_index(device: str) -> int:
    """CUDA device index for "auto", "cuda" or "cuda:N"; TensorRT has no CPU device."""
    parsed = parse_device(device)
    if parsed.kind == "cpu":
        raise UserError(
            "the tensorrt backend runs on a CUDA GPU only; "
            "use --backend onnxruntime for --device cpu"
        )
    return parsed.index


def cuda_version(encoded: int) -> str:
    """cudaDriverGetVersion / cudaRuntimeGetVersion encode 12.4 as 12040."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def driver_cuda_major(cudart: Any) -> int:
    """The CUDA major version the driver supports (what `nvidia-smi` shows as CUDA Version)."""
    return int(cuda_check(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")) // 1000


def check_driver(cudart: Any) -> None:
    """UserError when the driver is too old for the CUDA runtime cuda-python was built for.

    Within one major version CUDA's minor-version compatibility runs a newer runtime on an
    older driver (a warning says some features may be missing); across major versions
    (cuda-python 13 on a CUDA 12 driver) nothing runs, so that is refused with the fix.
    """
    driver = int(cuda_check(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion"))
    runtime = int(cuda_check(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
    if driver == 0:
        raise UserError(
            "no NVIDIA driver is installed here; the tensorrt backend needs an NVIDIA GPU and "
            "driver (use --backend onnxruntime otherwise)"
        )
    if driver // 1000 < runtime // 1000:
        fix = (
            f"install the build for this driver, `pip install 'sdrt[tensorrt-cu{driver // 1000}]'`"
            f" (`nvidia-smi` shows the driver's CUDA Version), or update the driver"
            if driver // 1000 in CUDA_EXTRAS
            else "update the driver (TensorRT 10 and later need CUDA 12 or newer)"
        )
        raise UserError(
            f"the NVIDIA driver here supports CUDA {cuda_version(driver)}, older than the CUDA "
            f"{cuda_version(runtime)} runtime cuda-python was built for; {fix}"
        )
    if driver < runtime:
        warnings.warn(
            f"the NVIDIA driver supports CUDA {cuda_version(driver)}, older than the CUDA "
            f"{cuda_version(runtime)} runtime; running through minor-version compatibility "
            "(no PTX JIT); update the driver if kernels fail to load",
            RuntimeWarning,
            stacklevel=3,
        )


def numpy_dtype(trt_type_name: str, tensor: str) -> np.dtype[Any]:
    """numpy type for a TensorRT DataType name (FLOAT, HALF, ...)."""
    if trt_type_name not in NUMPY_DTYPES:
        raise UserError(
            f"engine tensor {tensor!r} has TensorRT type {trt_type_name}, which numpy cannot "
            "hold; re-export the bundle (its graph inputs and outputs should be float32/int32)"
        )
    return NUMPY_DTYPES[trt_type_name]


def check_shape_in_profile(
    component: str, shapes: Mapping[str, Sequence[int]], profile: Profile
) -> None:
    """UserError when a request's input shapes fall outside the engine's optimization profile."""
    violation = profile_violation(shapes, profile)
    if violation is not None:
        raise UserError(
            f"{component}: {violation}; choose a size and batch inside the engine's range, or "
            "run `sdrt build` again with ranges that cover it"
        )


def current_environment(trt_api: TensorRT, device: CudaDevice) -> Environment:
    name, capability = device.name_and_capability()
    return Environment(trt_api.backend, trt_api.version, name, capability)


# ---- CUDA through cuda-python -------------------------------------------------------------


def cuda_check(cudart: Any, result: Any, what: str) -> Any:
    """Unwrap a cuda-python (error, value...) tuple; RuntimeError naming the call on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise RuntimeError(f"CUDA {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class CudaDevice:
    """One GPU as all engines on it share it: a stream, a scratch allocation and a lock."""

    def __init__(self, cudart: Any, index: int) -> None:
        self.cudart = cudart
        self.index = index
        check_driver(cudart)
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess:
            raise UserError(
                f"no usable CUDA GPU here ({getattr(err, 'name', err)}); the tensorrt backend "
                "needs an NVIDIA GPU and driver (use --backend onnxruntime otherwise)"
            )
        if index >= int(count):
            raise UserError(
                f"CUDA device {index} does not exist ({count} visible); choose another --device"
            )
        self.lock = threading.RLock()
        self.scratch_ptr = 0
        self.scratch_size = 0
        self.generation = 0  # bumped when the scratch moves: bound contexts and graphs go stale
        self._orphans: list[int] = []  # device memory of collected DeviceTensors, to free
        self._orphans_lock = threading.Lock()
        with self.active():
            self.stream = cuda_check(
                cudart,
                cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                "cudaStreamCreateWithFlags",
            )

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Hold the device's lock with this device current (the current device is per host
        thread, and another CudaDevice may have switched it since)."""
        with self.lock:
            cuda_check(self.cudart, self.cudart.cudaSetDevice(self.index), "cudaSetDevice")
            yield

    def name_and_capability(self) -> tuple[str, str]:
        props = cuda_check(
            self.cudart, self.cudart.cudaGetDeviceProperties(self.index), "cudaGetDeviceProperties"
        )
        raw = props.name
        name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return name.split("\x00", 1)[0].strip(), f"{props.major}.{props.minor}"

    # Callers hold `active()` for everything below.

    def malloc(self, nbytes: int) -> int:
        return int(cuda_check(self.cudart, self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, pointer: int) -> None:
        cuda_check(self.cudart, self.cudart.cudaFree(pointer), "cudaFree")

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A numpy array in page-locked host memory: copies from it run asynchronously at full
        bandwidth, where copies from pageable memory are staged by the driver."""
        count = int(np.prod(shape))
        nbytes = max(count * dtype.itemsize, 1)
        pointer = int(cuda_check(self.cudart, self.cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        memory = (ctypes.c_ubyte * nbytes).from_address(pointer)
        return np.frombuffer(memoryview(memory), dtype, count).reshape(shape)

    def free_pinned(self, array: np.ndarray) -> None:
        cuda_check(self.cudart, self.cudart.cudaFreeHost(array.ctypes.data), "cudaFreeHost")

    def upload(self, pointer: int, array: np.ndarray) -> None:
        """Queue a copy of `array` (pinned, alive until the next synchronize) to the device."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        result = self.cudart.cudaMemcpyAsync(
            pointer, array.ctypes.data, array.nbytes, kind, self.stream
        )
        cuda_check(self.cudart, result, "cudaMemcpyAsync (host to device)")

    def download(self, array: np.ndarray, pointer: int) -> None:
        """Queue a copy into `array`; it holds the values only after `synchronize`."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        result = self.cudart.cudaMemcpyAsync(
            array.ctypes.data, pointer, array.nbytes, kind, self.stream
        )
        cuda_check(self.cudart, result, "cudaMemcpyAsync (device to host)")

    def orphan(self, pointer: int) -> None:
        """Free `pointer` at the next `free_orphans`: a garbage-collected DeviceTensor may die
        mid-run, even mid-capture, where freeing would break the stream."""
        with self._orphans_lock:
            self._orphans.append(pointer)

    def free_orphans(self) -> None:
        with self._orphans_lock:
            pointers, self._orphans = self._orphans, []
        for pointer in pointers:
            self.free(pointer)

    def synchronize(self) -> None:
        cuda_check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "synchronize")

    def reserve_scratch(self, nbytes: int) -> None:
        """Grow the shared scratch to at least `nbytes`; contexts rebind on their next run."""
        with self.active():
            if nbytes <= self.scratch_size:
                return
            self.synchronize()
            if self.scratch_ptr:
                self.free(self.scratch_ptr)
                self.scratch_ptr, self.scratch_size = 0, 0
            self.scratch_ptr = self.malloc(nbytes)
            self.scratch_size = nbytes
            self.generation += 1

    def capture(self, enqueue: Callable[[], bool]) -> Any | None:
        """Record `enqueue` into an executable CUDA graph, or None when it cannot be captured."""
        cudart = self.cudart
        success = cudart.cudaError_t.cudaSuccess
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        if cudart.cudaStreamBeginCapture(self.stream, mode)[0] != success:
            return None
        try:
            enqueued = enqueue()
        finally:
            err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not enqueued or err != success:
            if err == success:
                cudart.cudaGraphDestroy(graph)
            return None
        err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
        cudart.cudaGraphDestroy(graph)
        return graph_exec if err == success else None

    def launch(self, graph_exec: Any) -> None:
        cuda_check(self.cudart, self.cudart.cudaGraphLaunch(graph_exec, self.stream), "launch")

    def destroy_graph(self, graph_exec: Any) -> None:
        self.cudart.cudaGraphExecDestroy(graph_exec)


_DEVICES: dict[int, CudaDevice] = {}
_DEVICES_LOCK = threading.Lock()


def shared_device(cudart: Any, index: int) -> CudaDevice:
    """The process's one CudaDevice for `index`.

    Process-wide on purpose: engines are constructed one by one (`load_engine`), and only a
    shared object lets them share a stream and one scratch allocation.
    """
    with _DEVICES_LOCK:
        if index not in _DEVICES:
            _DEVICES[index] = CudaDevice(cudart, index)
        return _DEVICES[index]


# ---- the engine ---------------------------------------------------------------------------


@dataclass(eq=False)
class DeviceTensor:
    """An input uploaded once (`TensorRTEngine.to_device`) and bound by address on every run;
    its device memory is freed after it is garbage-collected."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    device: CudaDevice


Binding = tuple[tuple[tuple[int, ...], ...], int, tuple[tuple[str, int], ...]]


@dataclass
class _Buffers:
    """Device buffers and their pinned host twins for one set of input shapes, and the CUDA
    graph recorded with them (with the binding it was recorded under)."""

    pointers: dict[str, int]
    staging: dict[str, np.ndarray]  # pinned host memory, one per input and output
    output_shapes: dict[str, tuple[int, ...]]
    graph: Any = None
    graph_binding: Binding | None = None


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


@dataclass
class _Feed:
    """One run's inputs: host arrays to stage and upload, and device tensors to bind."""

    host: dict[str, Any] = field(default_factory=dict)
    device: dict[str, DeviceTensor] = field(default_factory=dict)


class _LoadedEngine:
    """One deserialized engine with its one execution context."""

    def __init__(self, trt_api: TensorRT, device: CudaDevice, path: Path, cuda_graph: bool) -> None:
        module = trt_api.module
        with device.active():
            runtime = module.Runtime(trt_logger(trt_api))
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise UserError(
                    f"{trt_api.describe()} could not load {path} (see its log above); delete "
                    f"{path.parent} and run `sdrt build` again"
                )
            self.engine = engine
            self.device = device
            self.cuda_graph = cuda_graph
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            input_mode = module.TensorIOMode.INPUT
            self.input_names = [n for n in names if engine.get_tensor_mode(n) == input_mode]
            self.output_names = [n for n in names if n not in self.input_names]
            self.dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n).name, n) for n in names}
            self.profile: Profile = {}
            for name in self.input_names:
                low, opt, high = (_dims(d) for d in engine.get_tensor_profile_shape(name, 0))
                self.profile[name] = ShapeRange(low, opt, high)
            device.reserve_scratch(engine.device_memory_size_v2)
            strategy = module.ExecutionContextAllocationStrategy.USER_MANAGED
            if trt_api.backend == "tensorrt-rtx":  # RTX takes the strategy through a config
                config = engine.create_runtime_config()
                config.set_execution_context_allocation_strategy(strategy)
                self.context = engine.create_execution_context(config)
            else:
                self.context = engine.create_execution_context(strategy)
        self._buffers: OrderedDict[tuple[tuple[int, ...], ...], _Buffers] = OrderedDict()
        # What the context is bound to, and was last enqueued with
        self._bound: Binding | None = None
        self._enqueued: Binding | None = None

    def run(
        self, component: str, feeds: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        check_shape_in_profile(component, shapes, self.profile)
        feed = self._split(feeds)
        key = tuple(shapes[n] for n in self.input_names)
        device = self.device
        with device.active():
            device.free_orphans()
            buffers = self._buffers_for(key, shapes)
            addresses = {**buffers.pointers, **{n: t.pointer for n, t in feed.device.items()}}
            self._bind(key, shapes, addresses)
            for name, array in feed.host.items():
                buffers.staging[name][...] = array  # into pinned memory, cast to the engine type
                device.upload(buffers.pointers[name], buffers.staging[name])
            self._execute(buffers)
            for name in self.output_names:
                device.download(buffers.staging[name], buffers.pointers[name])
            device.synchronize()
            return {name: buffers.staging[name].copy() for name in self.output_names}

    def _split(self, feeds: Mapping[str, Any]) -> _Feed:
        feed = _Feed()
        for name in self.input_names:
            value = feeds[name]
            if not isinstance(value, DeviceTensor):
                feed.host[name] = value
            elif value.device is not self.device or value.dtype != self.dtypes[name]:
                raise UserError(
                    f"{name!r} was uploaded as {value.dtype} to cuda:{value.device.index}, but "
                    f"this engine takes {self.dtypes[name]} on cuda:{self.device.index}; upload "
                    "it with this engine's to_device"
                )
            else:
                feed.device[name] = value
        return feed

    def _set_input_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name in self.input_names:
            if not self.context.set_input_shape(name, shapes[name]):
                raise UserError(f"TensorRT refused input shape {shapes[name]} for {name!r}")

    def _buffers_for(
        self, key: tuple[tuple[int, ...], ...], shapes: Mapping[str, tuple[int, ...]]
    ) -> _Buffers:
        if key in self._buffers:
            self._buffers.move_to_end(key)
            return self._buffers[key]
        self._set_input_shapes(shapes)
        self._bound = None
        output_shapes = {n: _dims(self.context.get_tensor_shape(n)) for n in self.output_names}
        if any(d < 0 for shape in output_shapes.values() for d in shape):  # data-dependent
            raise RuntimeError(f"TensorRT could not infer the output shapes {output_shapes}")
        all_shapes = {**{n: tuple(shapes[n]) for n in self.input_names}, **output_shapes}
        device = self.device
        pointers = {
            name: device.malloc(int(np.prod(shape)) * self.dtypes[name].itemsize)
            for name, shape in all_shapes.items()
        }
        staging = {
            name: device.pinned(shape, self.dtypes[name]) for name, shape in all_shapes.items()
        }
        buffers = _Buffers(pointers, staging, output_shapes)
        self._buffers[key] = buffers
        while len(self._buffers) > SHAPES_KEPT:
            _, old = self._buffers.popitem(last=False)
            self._release(old)
        return buffers

    def _bind(
        self,
        key: tuple[tuple[int, ...], ...],
        shapes: Mapping[str, tuple[int, ...]],
        addresses: Mapping[str, int],
    ) -> None:
        """Point the context at these addresses and the current scratch, when they moved."""
        device = self.device
        state: Binding = (key, device.generation, tuple(sorted(addresses.items())))
        if self._bound == state:
            return
        self._set_input_shapes(shapes)
        for name, pointer in addresses.items():
            if not self.context.set_tensor_address(name, pointer):
                raise RuntimeError(f"TensorRT refused the device address for {name!r}")
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(device.scratch_ptr, device.scratch_size)
        else:  # TensorRT 10.0 and TensorRT-RTX name it as a property
            setattr(self.context, "device_memory", device.scratch_ptr)  # noqa: B010
        self._bound = state

    def _execute(self, buffers: _Buffers) -> None:
        device = self.device
        if buffers.graph is not None and buffers.graph_binding == self._bound:
            device.launch(buffers.graph)
            return
        if buffers.graph is not None:
            device.destroy_graph(buffers.graph)
            buffers.graph = None

        def enqueue() -> bool:
            return bool(self.context.execute_async_v3(device.stream_handle))

        # After new shapes or addresses TensorRT finishes its setup in the next enqueue, which
        # must run uncaptured: capture only once the context has run with this binding.
        if self.cuda_graph and self._enqueued == self._bound:
            graph = device.capture(enqueue)
            if graph is not None:
                buffers.graph, buffers.graph_binding = graph, self._bound
                device.launch(graph)
                return
            self.cuda_graph = False
            warnings.warn(
                "CUDA graph capture failed for this engine; running it without graphs",
                RuntimeWarning,
                stacklevel=4,
            )
        if not enqueue():
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        self._enqueued = self._bound

    def _release(self, buffers: _Buffers) -> None:
        if buffers.graph is not None:
            self.device.destroy_graph(buffers.graph)
        for pointer in buffers.pointers.values():
            self.device.free(pointer)
        for array in buffers.staging.values():
            self.device.free_pinned(array)

    def close(self) -> None:
        with self.device.active():
            self.device.synchronize()
            while self._buffers:
                _, buffers = self._buffers.popitem()
                self._release(buffers)
            self._bound = self._enqueued = None


class TensorRTEngine:
    """The Engine for one bundle component, backed by the engine built for this GPU."""

    def __init__(
        self,
        bundle: Bundle,
        component: str,
        device: str = "auto",
        *,
        cuda_graph: bool = False,
        tensorrt_module: str | None = None,
    ) -> None:
        info = bundle.components[component]
        self.component = component
        self.inputs = io_table(info.inputs)
        self.outputs = io_table(info.outputs)
        index = cuda_device_index(device)
        self.trt = import_tensorrt(tensorrt_module)
        self.device = shared_device(import_cudart(), index)
        self.environment = current_environment(self.trt, self.device)
        onnx_sha256 = {name: c.sha256 for name, c in bundle.components.items()}
        self.entries = usable_entries(
            bundle.root / ENGINES_DIR, component, self.environment, onnx_sha256
        )
        self.cuda_graph = cuda_graph
        self._loaded: dict[Path, _LoadedEngine] = {}
        self.bound: dict[str, DeviceTensor] = {}  # inputs fed on every call (`bind_banks`)

    def to_device(self, name: str, array: np.ndarray) -> DeviceTensor:
        """Upload `array` once for input `name`, to feed it on every call of a loop (the text
        conditioning of a request) without a host-to-device copy per call."""
        if name not in self.inputs:
            raise UserError(f"{self.component} has no input {name!r}")
        host = np.ascontiguousarray(array, dtype=np.dtype(self.inputs[name][0]))
        device = self.device
        with device.active():
            device.free_orphans()
            pointer = device.malloc(host.nbytes)
            device.upload(pointer, host)
            device.synchronize()  # `host` is pageable and dies with this call
        tensor = DeviceTensor(pointer, tuple(host.shape), host.dtype, device)
        weakref.finalize(tensor, device.orphan, pointer)
        return tensor

    def bind_banks(self, banks: Mapping[str, np.ndarray]) -> Callable[[str, slice], None]:
        """Upload `banks` (input name -> host array, the LoRA adapter pool) once into
        persistent device buffers bound by address on every run from now on; returns
        `changed(name, rows)`, which copies those rows of a bank after it was written (an
        adapter loaded): no refit, no rebuild, the addresses stay."""
        self._check_banks(banks)
        tensors = {name: self.to_device(name, array) for name, array in banks.items()}
        self.bound = {**self.bound, **tensors}

        def changed(name: str, rows: slice) -> None:
            host = banks[name]
            part = np.ascontiguousarray(host[rows])
            with self.device.active():
                self.device.upload(tensors[name].pointer + rows.start * host.strides[0], part)
                self.device.synchronize()  # `part` is pageable and dies with this call

        return changed

    def _check_banks(self, banks: Mapping[str, np.ndarray]) -> None:
        """Refuse, before any upload, a pool no built engine takes: its bank rows follow
        max_loras, and the engines' range follows `sdrt build --max-loras`."""
        reasons = []
        for entry in self.entries:
            profile = entry.spec.components[self.component].profile
            banked = {name: profile[name] for name in banks if name in profile}
            violation = profile_violation({n: a.shape for n, a in banks.items()}, banked)
            if violation is None:
                return
            reasons.append(violation)
        if reasons:
            raise UserError(
                f"no built {self.component} engine takes a LoRA pool this large ({reasons[0]}); "
                "use a max_loras (serve --max-loras) up to the one the engines were built "
                "for, or rebuild them with `sdrt build --max-loras N`"
            )

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        feeds = {**self.bound, **feeds}
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise UserError(f"{self.component} needs input(s) {', '.join(missing)}")
        shapes = {name: _shape(feeds[name]) for name in self.inputs}
        engine = self._engine_for(select_entry(self.entries, self.component, shapes))
        outputs = engine.run(self.component, feeds, shapes)
        return {name: outputs[name] for name in self.outputs}

    def _engine_for(self, entry: EngineEntry) -> _LoadedEngine:
        if entry.directory not in self._loaded:
            self._loaded[entry.directory] = _LoadedEngine(
                self.trt, self.device, entry.engine_path(self.component), self.cuda_graph
            )
        return self._loaded[entry.directory]

    def close(self) -> None:
        """Free this engine's device buffers and graphs (the shared scratch stays)."""
        for engine in self._loaded.values():
            engine.close()
        self._loaded.clear()


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, DeviceTensor):
        return value.shape
    return tuple(int(d) for d in np.shape(value))
