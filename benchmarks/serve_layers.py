"""What each serving layer costs: the same closed-loop load against `sdrt serve`, the Triton
repository (`sdrt triton-repo`) and Ray Serve with 1 and 2 replicas (`sdrt serve --ray`).

    python -m sdrt.benchmarks.serve_layers BUNDLE [--clients 8] [--requests 48]

HTTP targets are driven by bench-serve's own load loop (`serve_load.load_point`); Triton, whose
decoupled model speaks KServe v2 over gRPC streaming only, by the same closed loop written for
tritonclient here. Same workload mix (bench-serve's defaults), same seeds, continuous batching
with 16 rows everywhere. Prints a Markdown table with each layer's overhead against sdrt serve.
"""

from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .environment import machine, now, versions
from .harness import log, percentiles
from .serve_load import Mix, load_point
from .serve_process import ServeProcess
from .tritonserver import TritonServer, triton_venv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    mix = Mix((10, 20, 30), ("ddim", "euler"), (7.5, 3.0), args.size, seed=0)
    rows = {}
    for name, run in targets(Path(args.bundle), mix, args.clients, args.requests).items():
        log(f"serve-layers: {name}")
        rows[name] = run()
    print(report(rows, args))
    return 0


def targets(
    bundle: Path, mix: Mix, clients: int, count: int
) -> dict[str, Callable[[], dict[str, Any]]]:
    def http(options: list[str]) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            server = ServeProcess([bundle], [*options, "--max-steps", "1000"]).start(300)
            try:
                load_point(server.url, mix, clients, clients=clients)  # warm-up round
                return load_point(server.url, mix, count, clients=clients)
            finally:
                server.stop()

        return run

    return {
        "sdrt serve": http([]),
        "Triton (python backend, decoupled)": lambda: triton(bundle, mix, clients, count),
        "Ray Serve, 1 replica": http(["--ray", "--replicas", "1"]),
        "Ray Serve, 2 replicas": http(["--ray", "--replicas", "2"]),
    }


def triton(bundle: Path, mix: Mix, clients: int, count: int) -> dict[str, Any]:
    from sdrt.serve.triton_repo import RepoOptions, write_repository

    with tempfile.TemporaryDirectory() as folder:
        repo = Path(folder) / "repo"
        options = RepoOptions(kind="cpu", max_batch_rows=16, python_env=str(triton_venv()))
        write_repository(bundle, repo, options)
        with TritonServer(repo, Path(folder) / "tritonserver.log") as server:
            triton_closed_loop(server.grpc_url, mix, clients, clients)  # warm-up round
            return triton_closed_loop(server.grpc_url, mix, count, clients)


def triton_closed_loop(url: str, mix: Mix, count: int, clients: int) -> dict[str, Any]:
    """`clients` threads, each with its own gRPC stream, one request in flight at a time."""
    import tritonclient.grpc as grpcclient

    bodies = iter(mix.requests(count))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]

    def client_loop() -> None:
        done: queue.Queue = queue.Queue()
        with grpcclient.InferenceServerClient(url) as client:
            client.start_stream(callback=lambda result, error: done.put(error))
            while True:
                with lock:
                    body = next(bodies, None)
                if body is None:
                    break
                sent = time.perf_counter()
                client.async_stream_infer("sdrt", kserve_inputs(grpcclient, body))
                error = done.get(timeout=600)
                with lock:
                    if error is None:
                        latencies.append((time.perf_counter() - sent) * 1e3)
                    else:
                        errors[0] += 1
            client.stop_stream()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    elapsed = time.perf_counter() - start
    return {
        "requests": count,
        "errors": errors[0],
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "latency_ms": percentiles(latencies),
    }


def kserve_inputs(grpcclient: Any, body: dict[str, Any]) -> list[Any]:
    width, height = (int(v) for v in body["size"].split("x"))
    values = {
        "prompt": (np.array([body["prompt"].encode()], object), "BYTES"),
        "scheduler": (np.array([body["scheduler"].encode()], object), "BYTES"),
        "num_inference_steps": (np.array([body["num_inference_steps"]], np.int32), "INT32"),
        "guidance_scale": (np.array([body["guidance_scale"]], np.float32), "FP32"),
        "seed": (np.array([body["seed"]], np.int64), "INT64"),
        "height": (np.array([height], np.int32), "INT32"),
        "width": (np.array([width], np.int32), "INT32"),
    }
    tensors = []
    for name, (array, dtype) in values.items():
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    base = rows["sdrt serve"]
    lines = [
        f"{now()}, {machine('cpu', None).get('cpu', '')}; versions {versions()}",
        f"`python -m sdrt.benchmarks.serve_layers {' '.join(sys.argv[1:])}`",
        "",
        "| target | req/s | p50 ms | p99 ms | errors | req/s vs sdrt serve | p50 overhead ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        p50, p99 = row["latency_ms"]["p50"], row["latency_ms"]["p99"]
        lines.append(
            f"| {name} | {row['requests_per_s']:.2f} | {p50:.0f} | {p99:.0f} | {row['errors']} "
            f"| {row['requests_per_s'] / base['requests_per_s']:.2f}x "
            f"| {p50 - base['latency_ms']['p50']:+.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
