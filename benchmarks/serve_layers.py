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

from .environment import machine, now, versions
from .harness import log, percentiles
from .serve_load import Mix, load_point
from .serve_process import ServeProcess
from .tritonserver import TritonServer, triton_venv

TARGETS = {
    "serve": "sdrt serve",
    "triton": "Triton (python backend, decoupled)",
    "ray1": "Ray Serve, 1 replica",
    "ray2": "Ray Serve, 2 replicas",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT")
    parser.add_argument("--targets", default=",".join(TARGETS), help="a subset, in this order")
    args = parser.parse_args(argv)
    mix = Mix((10, 20, 30), ("ddim", "euler"), (7.5, 3.0), args.size, seed=0)
    runs = targets(Path(args.bundle), mix, args.clients, args.requests)
    rows = {}
    for key in args.targets.split(","):
        log(f"serve-layers: {TARGETS[key]}")
        rows[TARGETS[key]] = runs[key]()
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
        "serve": http([]),
        "triton": lambda: triton(bundle, mix, clients, count),
        "ray1": http(["--ray", "--replicas", "1"]),
        "ray2": http(["--ray", "--replicas", "2"]),
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
                client.async_stream_infer("sdrt", kserve_inputs(grpcclient, kserve_values(body)))
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


def kserve_inputs(grpcclient: Any, values: dict[str, Any]) -> list[Any]:
    """Request values (`sdrt.serve.triton_repo.INPUTS` names) as tritonclient input tensors."""
    from sdrt.serve.triton_repo import request_tensors

    tensors = []
    for name, (array, datatype) in request_tensors(values).items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def kserve_values(body: dict[str, Any]) -> dict[str, Any]:
    """A bench-serve request body as the Triton model's inputs ("size" -> height, width)."""
    width, height = (int(v) for v in body["size"].split("x"))
    return {**{k: v for k, v in body.items() if k != "size"}, "height": height, "width": width}


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    base = rows.get(TARGETS["serve"], next(iter(rows.values())))
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
