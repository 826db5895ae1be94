"""What the run-time LoRA branch costs: U-Net call time with the branch vs the plain graph, and
loading an adapter while the U-Net keeps stepping.

    python -m sdrt.benchmarks.lora --preset sd15 --size 256 --rank 32 --work DIR [--device cuda]

Exports the preset's U-Net twice into DIR (plain, and with the branch of rank R), then on ONNX
Runtime, with the two graphs' calls interleaved (a shared machine drifts; interleaving makes
both see the same drift):
- `no_adapter`: batch 2 (one guided image) without adapters (rank-1 branch of zeros);
- `batch16_8_adapters`: 16 rows carrying 8 distinct adapters of rank R (two rows each);
- `load`: an adapter file of rank R on every branch layer loaded into the pool (max_loras 16)
  while the U-Net steps in another thread; the longest step meanwhile vs the median step.
Ratios: of the medians, of the minima, and the median ratio of interleaved pairs; the JSON
report goes to stdout and `--json` (there rewritten as each part ends, so a run stopped by a
timeout keeps what it measured).

    python -m sdrt.benchmarks.lora --preset sd15 --rank 64 --load-only [--repeats N]

measures loading alone, without exporting anything: an adapter of rank R on every branch
layer of the preset's U-Net (its layer list read from the architecture built without
weights) loaded N times into a pool over host arrays, as ONNX Runtime's CPU provider binds
them (rank 64 in fp32 is a 96 MB file for SD 1.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.atomic_files import write_atomic
from sdrt.lora_pool import INDEX, SCALE, AdapterPool

from .environment import command_line, machine, now, versions


def branch_record(preset: str, rank: int) -> dict[str, Any]:
    """The U-Net's branch layers as export records them, from the architecture built on the
    meta device (no weights, no export)."""
    from sdrt.export import lora_branch
    from sdrt.export.load import random_pipeline

    unet = random_pipeline(preset, device="meta").unet
    layers = [
        {"name": lora_branch.layer_name(path), "in": linear.in_features, "out": linear.out_features}
        for path, linear in lora_branch.target_layers(unet).items()
    ]
    return {"rank": rank, "layers": {"unet": layers}}


class HostBanks:
    """An engine that binds the pool's arrays as they are: what ONNX Runtime's CPU provider
    does (its OrtValues share the arrays' memory, so a written row needs nothing more)."""

    def bind_banks(self, banks: dict[str, np.ndarray]) -> Any:
        return lambda name, rows: None


def measure_load(args: argparse.Namespace, emit: Any) -> dict[str, Any]:
    """Loading alone: an adapter of rank R on every branch layer, loaded `repeats` times, while
    another thread ticks every millisecond: its longest gap bounds how long a load keeps
    the interpreter from a batcher thread (whose engine calls run without it)."""
    record = branch_record(args.preset, args.rank)
    pool = AdapterPool(record, {"unet": HostBanks()}, max_loras=16)
    report: dict[str, Any] = {**header(args), "layers": len(record["layers"]["unet"])}
    with tempfile.TemporaryDirectory() as tmp:
        path = adapter_file(record, args.rank, Path(tmp) / "adapter.safetensors", 0)
        report["adapter_file_bytes"] = path.stat().st_size
        with Ticker() as idle:  # the machine's own gaps, for comparison
            time.sleep(1.0)
        report["longest_tick_gap_idle_ms"] = round(idle.longest_gap_s * 1e3, 1)
        load_s, gaps = [], []
        for i in range(args.repeats):
            with Ticker() as ticker:
                start = time.perf_counter()
                pool.load(f"a{i % 4}", path)  # four slots in turn
                load_s.append(time.perf_counter() - start)
            gaps.append(ticker.longest_gap_s)
    report |= {
        "load_s": load_s,
        "load_median_s": statistics.median(load_s),
        "longest_tick_gap_during_load_ms": [round(g * 1e3, 1) for g in gaps],
    }
    emit(report)
    return report


class Ticker:
    """A thread that wakes every millisecond and keeps the longest gap between two wakes."""

    def __init__(self) -> None:
        self.longest_gap_s = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick)

    def _tick(self) -> None:
        last = time.perf_counter()
        while not self._done.wait(0.001):
            now = time.perf_counter()
            self.longest_gap_s = max(self.longest_gap_s, now - last)
            last = now

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def export_unets(preset: str, rank: int, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The preset's U-Net as ONNX, plain and with the branch; and the branch record."""
    from sdrt.export import lora_branch
    from sdrt.export.load import random_pipeline
    from sdrt.export.onnx_export import components, export_onnx, trace_dims

    plain, branch = work / "plain" / "unet.onnx", work / "branch" / "unet.onnx"
    record_file = work / "branch" / "lora_branch.json"
    if record_file.is_file():
        return plain, branch, json.loads(record_file.read_text())
    pipe = random_pipeline(preset, seed=0)
    unet = next(c for c in components(pipe) if c.name == "unet")
    dims = trace_dims(16, 1000, 8)
    for path in (plain, branch):
        path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(unet, dims, plain, "fp32", external_data=True)
    records = lora_branch.add_branches(unet, pipe.unet)
    export_onnx(unet, {**dims, **lora_branch.branch_dims(rank, False)}, branch, "fp32", True)
    record = {"rank": rank, "layers": {"unet": records}}
    record_file.write_text(json.dumps(record))
    return plain, branch, record


class Runner:
    """One ONNX Runtime session over IO binding, with banks bound once (as OnnxRuntimeEngine):
    on the CPU sharing the pool's arrays, on CUDA device values refilled when written."""

    def __init__(self, path: Path, threads: int, device: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
        self.device = device
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = {i.name: ("int64" if "int64" in i.type else "float32", []) for i in
                       self.session.get_inputs()}  # fmt: skip
        self.bound: dict[str, Any] = {}
        text = next(i for i in self.session.get_inputs() if i.name == "encoder_hidden_states")
        self.text_dim = int(text.shape[-1])

    def bind_banks(self, banks: dict[str, np.ndarray]) -> Any:
        import onnxruntime as ort

        values = {k: ort.OrtValue.ortvalue_from_numpy(v, self.device) for k, v in banks.items()}
        self.bound.update(values)
        if self.device == "cpu":
            return lambda name, rows: None  # the OrtValues share the arrays
        return lambda name, rows: values[name].update_inplace(banks[name])

    def run(self, feeds: dict[str, np.ndarray]) -> float:
        """Seconds for one call."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in self.bound.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("noise_pred", "cpu")
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        return time.perf_counter() - start


def unet_feeds(rows: int, size: int, text_dim: int, rng: np.random.Generator) -> dict[str, Any]:
    latent = size // 8
    return {
        "sample": rng.standard_normal((rows, 4, latent, latent), np.float32),
        "timestep": np.full(rows, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((rows, 77, text_dim), np.float32),
    }


def adapter_file(record: dict[str, Any], rank: int, path: Path, seed: int) -> Path:
    """A kohya-named LoRA of rank `rank` on every branch layer, fp32."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in record["layers"]["unet"]:
        key = "lora_unet_" + layer["name"].replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = rng.standard_normal((rank, layer["in"]), np.float32)
        tensors[f"{key}.lora_up.weight"] = 1e-3 * rng.standard_normal(
            (layer["out"], rank), np.float32
        )
        tensors[f"{key}.alpha"] = np.array(float(rank), np.float32)
    save_file(tensors, str(path))
    return path


def interleaved(calls: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Each call `repeats` times, alternating, after one warm-up each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(call())
    return times


def summary(times: dict[str, list[float]], plain: str, branch: str) -> dict[str, Any]:
    """Medians, minima and the median of the ratios of each interleaved pair: on a shared
    machine the pair ratio and the minima move least with the other processes' load."""
    medians = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    minima = {name: min(v) * 1e3 for name, v in times.items()}
    pairs = [b / p for p, b in zip(times[plain], times[branch], strict=True)]
    return {
        "median_ms": medians,
        "min_ms": minima,
        "all_ms": {name: [round(t * 1e3, 1) for t in v] for name, v in times.items()},
        "ratio_of_medians": medians[branch] / medians[plain],
        "ratio_of_minima": minima[branch] / minima[plain],
        "median_pair_ratio": statistics.median(pairs),
    }


def header(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "lora",
        "date": now(),
        "command": command_line(),
        "preset": args.preset,
        "size": args.size,
        "rank": args.rank,
        "threads": args.threads,
        "versions": versions(),
        "machine": machine(args.device, None),
    }


def measure(args: argparse.Namespace, emit: Any) -> dict[str, Any]:
    work = Path(args.work)
    plain_path, branch_path, record = export_unets(args.preset, args.rank, work)
    plain = Runner(plain_path, args.threads, args.device)
    branch = Runner(branch_path, args.threads, args.device)
    pool = AdapterPool(record, {"unet": branch}, max_loras=16)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = [adapter_file(record, args.rank, Path(tmp) / f"a{i}.safetensors", i) for i in
                 range(8)]  # fmt: skip
        load_s = []
        for i, path in enumerate(files):
            start = time.perf_counter()
            pool.load(f"a{i}", path)
            load_s.append(time.perf_counter() - start)
        adapter_bytes = files[0].stat().st_size
        report = {**header(args), "adapter_file_bytes": adapter_bytes, "load_s": load_s}
        emit(report)
        two = unet_feeds(2, args.size, plain.text_dim, rng)
        none = {**two, INDEX: np.zeros((2, 1), np.int64), SCALE: np.zeros((2, 1), np.float32)}
        report["no_adapter"] = summary(
            interleaved(
                {"plain": lambda: plain.run(two), "branch": lambda: branch.run(none)},
                args.repeats,
            ),
            "plain",
            "branch",
        )
        emit(report)
        sixteen = unet_feeds(16, args.size, plain.text_dim, rng)
        holds = [pool.hold({f"a{i}": 1.0}) for i in range(8)]
        rows = [hold.rows(2) for hold in holds]
        mixed = {**sixteen, **{k: np.concatenate([r[k] for r in rows]) for k in (INDEX, SCALE)}}
        report["batch16_8_adapters"] = summary(
            interleaved(
                {"plain": lambda: plain.run(sixteen), "branch": lambda: branch.run(mixed)},
                args.repeats,
            ),
            "plain",
            "branch",
        )
        emit(report)
        for hold in holds:
            hold.release()
        report["load"] = load_while_stepping(pool, branch, none, files[0], args.repeats)
        emit(report)
    return report


def load_while_stepping(
    pool: AdapterPool, runner: Runner, feeds: dict[str, np.ndarray], path: Path, repeats: int
) -> dict[str, Any]:
    """The U-Net steps in this thread while another loads `path` (as a server's request thread
    would); each step's duration during the load vs the median step alone."""
    alone = [runner.run(feeds) for _ in range(repeats)]
    done = threading.Event()
    loaded: list[float] = []

    def load() -> None:
        start = time.perf_counter()
        pool.load("late", path)
        loaded.append(time.perf_counter() - start)
        done.set()

    worker = threading.Thread(target=load)
    during = []
    worker.start()
    while not done.is_set():
        during.append(runner.run(feeds))
    worker.join()
    median = statistics.median(alone)
    return {
        "load_s": loaded[0],
        "step_alone_median_ms": median * 1e3,
        "steps_during_load_ms": [round(t * 1e3, 1) for t in during],
        "longest_step_during_load_over_median": max(during) / median,
    }


def arguments() -> argparse.ArgumentParser:
    """The command line (benchmarks/gpu_session.sh --dry-run checks its LoRA phase with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", help="folder for the exported U-Nets (reused)")
    parser.add_argument(
        "--load-only", action="store_true", help="measure loading alone (no export, no --work)"
    )
    parser.add_argument("--json", help="also write the report here, as each part ends")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments()
    args = parser.parse_args(argv)
    if not args.load_only and not args.work:
        parser.error("--work is required (or --load-only)")

    def emit(report: dict[str, Any]) -> None:
        if args.json:
            write_atomic(args.json, json.dumps(report, indent=2) + "\n")

    report = measure_load(args, emit) if args.load_only else measure(args, emit)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
