"""Fakes of cuda-python's runtime API and of TensorRT, as far as sdrt's backend and builder use
them, for tests without a GPU.

FakeCudart follows `cuda.bindings.runtime` as cuda-bindings 12.9.4's runtime.pyx defines it
(every call returns an (error, values...) tuple; cudaMallocHost gives an int address,
cudaDriverGetVersion / cudaRuntimeGetVersion an int like 12080). Device memory is bytes at
integer addresses, freed memory is gone (using it fails), pinned host memory is real host
memory, and there is one stream whose async copies and kernel launches are queued and run in
order only when the stream is synchronized (or memory is freed, which synchronizes in CUDA).
Stream capture records work instead of queueing it; a launched graph queues the recorded work,
which reads and writes the addresses bound when it was captured. Memory, streams, engines and
contexts belong to the device current when they were made, and using them from another device
fails, as it does on a GPU.

The TensorRT fakes follow the 10.x API (tensorrt-stubs 10.13) and the 11.x API (the names in
the tensorrt-cu12-bindings 11.4 wheel, see `tensorrt_api.py`): 11.x has no BuilderFlag.FP16.
"""

from __future__ import annotations

import ctypes
import json
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from tensorrt_api import BUILDER_FLAGS_REMOVED_IN_11, stub_api

from sdrt.backends import tensorrt as trt_backend
from sdrt.export import tensorrt_build as tb

OK = 0
STREAM = 100  # the stream made on device N is STREAM + N
TEXT_DIM = 768
TRT_VERSIONS = {"10": "10.13.0.35", "11": "11.4.0.106"}
Work = Callable[[], None]


class FakeCudart:
    cudaError_t = types.SimpleNamespace(cudaSuccess=OK)
    cudaStreamNonBlocking = 1
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self, devices: int = 1, driver: int = 12080, runtime: int = 12080) -> None:
        self.devices, self.driver, self.runtime = devices, driver, runtime
        self.current = 0
        self.memory: dict[int, bytearray] = {}
        self.owner: dict[int, int] = {}  # device address -> the device it was allocated on
        self.pinned: dict[int, Any] = {}  # address -> ctypes buffer that owns it
        self.next_address = 0x1000
        self.mallocs = 0
        self.launches = 0
        self.queue: list[Work] = []
        self.captured: list[Work] | None = None
        self.events: list[tuple[str, int]] = []  # (call, device current at the call)
        self.uploads: list[bool] = []  # per host-to-device copy: was the source pinned?

    def record(self, call: str) -> None:
        self.events.append((call, self.current))

    def on_current_device(self, address: int) -> None:
        assert self.owner[address] == self.current, (
            f"memory of cuda:{self.owner[address]} used with cuda:{self.current} current"
        )

    def check_stream(self, stream: int) -> None:
        assert stream == STREAM + self.current, "stream used with another device current"

    def live(self, address: int) -> bytearray:
        """The device memory at `address`; fails as the GPU would fault on freed memory."""
        assert address in self.memory, f"device memory {address:#x} used after cudaFree"
        return self.memory[address]

    def enqueue(self, work: Work) -> None:
        if self.captured is None:
            self.queue.append(work)
        else:
            self.captured.append(work)

    def drain(self) -> None:
        queue, self.queue = self.queue, []
        for work in queue:
            work()

    def cudaDriverGetVersion(self) -> tuple[int, int]:
        return OK, self.driver

    def cudaRuntimeGetVersion(self) -> tuple[int, int]:
        return OK, self.runtime

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return OK, self.devices

    def cudaSetDevice(self, index: int) -> tuple[int]:
        assert 0 <= index < self.devices
        self.current = index
        return (OK,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:
        self.record("cudaStreamCreateWithFlags")
        return OK, STREAM + self.current

    def cudaGetDeviceProperties(self, index: int) -> tuple[int, Any]:
        return OK, types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\x00\x00", major=9, minor=0)

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        self.record("cudaMalloc")
        address, self.next_address = self.next_address, self.next_address + nbytes + 256
        self.memory[address] = bytearray(nbytes)
        self.owner[address] = self.current
        self.mallocs += 1
        return OK, address

    def cudaFree(self, address: int) -> tuple[int]:
        self.record("cudaFree")
        self.on_current_device(address)
        self.drain()
        del self.memory[address]
        return (OK,)

    def cudaMallocHost(self, nbytes: int) -> tuple[int, int]:
        self.record("cudaMallocHost")
        buffer = ctypes.create_string_buffer(nbytes)
        self.pinned[ctypes.addressof(buffer)] = buffer
        return OK, ctypes.addressof(buffer)

    def cudaFreeHost(self, address: int) -> tuple[int]:
        self.drain()
        del self.pinned[address]
        return (OK,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> tuple[int]:
        self.record("cudaMemcpyAsync")
        self.check_stream(stream)
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.uploads.append(src in self.pinned)
            self.on_current_device(dst)

            def work() -> None:  # reads the host memory when the copy runs, not when queued
                self.live(dst)[:n] = ctypes.string_at(src, n)
        else:
            self.on_current_device(src)

            def work() -> None:
                ctypes.memmove(dst, bytes(self.live(src)[:n]), n)

        self.enqueue(work)
        return (OK,)

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        self.check_stream(stream)
        self.drain()
        return (OK,)

    def cudaStreamBeginCapture(self, stream: int, mode: int) -> tuple[int]:
        self.captured = []
        return (OK,)

    def cudaStreamEndCapture(self, stream: int) -> tuple[int, list[Work]]:
        graph, self.captured = self.captured or [], None
        return OK, graph

    def cudaGraphInstantiate(self, graph: list[Work], flags: int) -> tuple[int, list[Work]]:
        return OK, list(graph)

    def cudaGraphDestroy(self, graph: Any) -> tuple[int]:
        return (OK,)

    def cudaGraphExecDestroy(self, graph: Any) -> tuple[int]:
        return (OK,)

    def cudaGraphLaunch(self, graph: list[Work], stream: int) -> tuple[int]:
        self.record("cudaGraphLaunch")
        self.check_stream(stream)
        self.launches += 1
        self.queue.extend(graph)
        return (OK,)


class FakeContext:
    """noise_pred = 2 * sample + the first value of encoder_hidden_states (text encoder:
    embeddings = input ids as float); each run also writes the engine's scratch, so a run bound
    to freed scratch fails."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.scratch: tuple[int, int] | None = None
        self.enqueues = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        source = self.shapes[self.engine.source]
        return source if name == "noise_pred" else (*source, TEXT_DIM)

    def set_tensor_address(self, name: str, address: int) -> bool:
        assert self.engine.cudart.owner[address] == self.engine.device, "buffer on another GPU"
        self.addresses[name] = address
        return True

    def set_device_memory(self, address: int, size: int) -> None:
        assert self.engine.cudart.owner[address] == self.engine.device, "scratch on another GPU"
        self.scratch = (address, size)

    def execute_async_v3(self, stream: int) -> bool:
        cudart, engine = self.engine.cudart, self.engine
        cudart.record("execute_async_v3")
        assert cudart.current == engine.device, "context run with another device current"
        cudart.check_stream(stream)
        self.enqueues += 1
        src, dst = self.addresses[engine.source], self.addresses[engine.output]
        src_type = np.float32 if engine.output == "noise_pred" else np.int32
        count = int(np.prod(self.get_tensor_shape(engine.output)))
        assert self.scratch is not None and self.scratch[1] >= engine.device_memory_size_v2
        scratch = self.scratch[0]
        conditioning = self.addresses.get("encoder_hidden_states")

        def work() -> None:  # reads through the addresses bound now, like a captured kernel
            cudart.live(scratch)[:4] = b"used"
            values = np.frombuffer(bytes(cudart.live(src)), src_type).astype(np.float32)
            if engine.output == "noise_pred":
                shift = 0.0
                if conditioning is not None:
                    shift = float(
                        np.frombuffer(bytes(cudart.live(conditioning)[:4]), np.float32)[0]
                    )
                result = 2 * values + np.float32(shift)
            else:
                result = np.repeat(values, TEXT_DIM)
            cudart.live(dst)[:] = result[:count].astype(np.float32).tobytes()

        cudart.enqueue(work)
        return True


class FakeEngine:
    def __init__(self, cudart: FakeCudart, record: dict[str, Any]) -> None:
        self.cudart = cudart
        self.device = cudart.current  # an engine lives on the device current at deserialization
        self.profile = record["profile"]
        self.inputs = list(self.profile)
        self.output = "noise_pred" if "sample" in self.profile else "text_embeddings"
        self.source = "sample" if "sample" in self.profile else "input_ids"
        self.device_memory_size_v2 = record["scratch"]
        self.num_io_tensors = len(self.inputs) + 1
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, index: int) -> str:
        return [*self.inputs, self.output][index]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> Any:
        return types.SimpleNamespace(name="INT32" if name == "input_ids" else "FLOAT")

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        return [tuple(self.profile[name][k]) for k in ("min", "opt", "max")]

    def create_execution_context(self, strategy: str) -> FakeContext:
        assert strategy == "USER_MANAGED"
        assert self.cudart.current == self.device, "context made with another device current"
        self.cudart.record("create_execution_context")
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_runtime_api(cudart: FakeCudart) -> trt_backend.TensorRT:
    """The runtime half of TensorRT: engines are JSON written by `fake_engine`."""
    engines: list[FakeEngine] = []

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
            cudart.record("deserialize_cuda_engine")
            engines.append(FakeEngine(cudart, json.loads(data)))
            return engines[-1]

    module = types.SimpleNamespace(
        __version__=TRT_VERSIONS["10"],
        Runtime=Runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT"),
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"),
        engines=engines,
    )
    return trt_backend.TensorRT(module, "tensorrt", "tensorrt")  # type: ignore[arg-type]


ENGINE_SCRATCH = {"text_encoder": 1000, "unet": 5000}  # bytes; other engines 100


def fake_engine(job: tb.BuildJob) -> tb.BuiltEngine:
    profile = {name: {"min": r.min, "opt": r.opt, "max": r.max} for name, r in job.profile.items()}
    record = {"profile": profile, "scratch": ENGINE_SCRATCH.get(job.component, 100)}
    return tb.BuiltEngine(json.dumps(record).encode(), None)


def builder_flags(major: str) -> types.SimpleNamespace:
    """BuilderFlag as TensorRT `major` has it: the 10.13 stubs' members, less those 11 removed."""
    classes, _ = stub_api()
    members = {m for m in classes["BuilderFlag"] if m.isupper()}
    if major == "11":
        members -= BUILDER_FLAGS_REMOVED_IN_11
    return types.SimpleNamespace(**{m: m for m in sorted(members)})


class FakeBuildAPI:
    """Records what TensorRTBuilder asks of the TensorRT builder API of version `major`."""

    STRONGLY_TYPED = 1

    def __init__(
        self,
        inputs: list[str] | None,
        major: str = "10",
        timing_cache_valid: bool = True,
        build_ok: bool = True,
    ):
        self.calls: list[tuple[Any, ...]] = []
        self.inputs = inputs  # the network's inputs; None: those of the ONNX parsed
        self.major = major
        self.timing_cache_valid = timing_cache_valid
        self.build_ok = build_ok
        self.parsed: list[tuple[str, bytes]] = []  # (path, contents) of each ONNX parsed

    def module(self) -> Any:
        api = self
        ns = types.SimpleNamespace

        class Config:
            builder_optimization_level = 3

            def set_flag(self, flag: str) -> None:
                api.calls.append(("flag", flag))

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                api.calls.append(("pool", pool, size))

            def create_timing_cache(self, data: bytes) -> bytes:
                api.calls.append(("load cache", bytes(data)))
                return bytes(data)

            def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
                return api.timing_cache_valid or cache == b""

            def get_timing_cache(self) -> Any:
                return ns(serialize=lambda: b"timings after " + str(len(api.calls)).encode())

            def add_optimization_profile(self, profile: Any) -> int:
                return 0

        class Network:
            def __init__(self, inputs: list[str]) -> None:
                self.inputs = inputs

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, index: int) -> Any:
                return ns(name=self.inputs[index])

        class Profile:
            def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
                api.calls.append(("shape", name, low, opt, high))

        class Builder:
            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                api.calls.append(("network flags", flags))
                return Network(list(api.inputs or []))

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Any, config: Config) -> bytes | None:
                api.calls.append(("optimization level", config.builder_optimization_level))
                return b"serialized" if api.build_ok else None

        class Parser:
            num_errors = 0

            def __init__(self, network: Network, logger: Any) -> None:
                self.network = network

            def parse_from_file(self, path: str) -> bool:
                with open(path, "rb") as graph:  # as TensorRT does: the file must exist
                    api.parsed.append((path, graph.read()))
                if api.inputs is None:
                    import onnx

                    model = onnx.load(path, load_external_data=False)
                    self.network.inputs = [i.name for i in model.graph.input]
                return True

        return ns(
            __version__=TRT_VERSIONS[self.major],
            Builder=Builder,
            OnnxParser=Parser,
            Dims=tuple,
            BuilderFlag=builder_flags(self.major),
            MemoryPoolType=ns(WORKSPACE="WORKSPACE"),
            NetworkDefinitionCreationFlag=ns(STRONGLY_TYPED=self.STRONGLY_TYPED),
        )
