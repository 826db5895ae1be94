"""`sdrt bench-serve`: load-test `sdrt serve` and compare its batching modes in one run.

First measures what batching can give at all: the U-Net's rows/s at the largest batch over
its rows/s at one guided request (the bound). Then, for each mode (no batching, request-level,
continuous), starts the server (or targets --url), drives it with closed loops of C clients
and an open-loop Poisson arrival rate from a mixed workload, and reads latency, time to first
U-Net step and rows per U-Net call. With --rounds N the modes are measured N times, interleaved
(each round reverses the order of the one before and starts each server afresh), so that drift
in a shared machine's load falls on every mode alike and the spread between rounds shows.
Writes bench-serve.json, .md and .png.
"""

from __future__ import annotations

import argparse
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.errors import UserError

from .environment import command_line, machine, now, versions
from .harness import log, percentiles

SCHEMA = "sdrt-bench-serve/1"
# mode name -> sdrt serve options (max-batch-rows filled in)
MODES = {
    "none": ["--batching", "continuous", "--max-batch-rows", "2"],
    "request": ["--batching", "request"],
    "continuous": ["--batching", "continuous"],
}
MODE_TITLES = {"none": "no batching", "request": "request-level", "continuous": "continuous"}
# at one client, continuous batching must reach at least this share of the other modes' req/s
ONE_CLIENT_TARGET = 0.97


@dataclass(frozen=True)
class Mix:
    """The workload: each request draws its steps, scheduler and guidance from these."""

    steps: tuple[int, ...]
    schedulers: tuple[str, ...]
    guidance: tuple[float, ...]
    size: str  # WIDTHxHEIGHT
    seed: int

    def requests(self, count: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(self.seed)
        return [
            {
                "prompt": f"a lighthouse in a storm, study {i}",
                "size": self.size,
                "num_inference_steps": int(rng.choice(self.steps)),
                "scheduler": str(rng.choice(self.schedulers)),
                "guidance_scale": float(rng.choice(self.guidance)),
                "seed": i,
            }
            for i in range(count)
        ]


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench-serve",
        help="load-test sdrt serve: no / request-level / continuous batching (needs sdrt[serve])",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("bundle", nargs="?", help="bundle to serve (and to measure the bound on)")
    parser.add_argument("--url", help="target a running server instead (measures its one mode)")
    parser.add_argument("--modes", default="none,request,continuous")
    parser.add_argument("--concurrency", default="1,4,8", help="closed-loop clients, a list")
    parser.add_argument(
        "--rate",
        type=float,
        help="Poisson arrivals/s (default: 70 %% of the "
        "continuous closed-loop rate at the top concurrency); 0 skips",
    )
    parser.add_argument("--requests", type=int, default=48, help="requests per load point")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every mode this many times, interleaved (each round in the reverse "
        "order of the one before); the report gives medians and the spread",
    )
    parser.add_argument("--steps", default="10,20,30")
    parser.add_argument("--schedulers", default="ddim,euler")
    parser.add_argument("--guidance", default="7.5,3.0")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the bundle's)")
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-serve", help="folder for the reports")
    parser.set_defaults(handler=cmd_bench_serve)
    return parser


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .serve_report import write_reports

    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in write_reports(result, out):
        print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    if (args.bundle is None) == (args.url is None):
        raise UserError("give a BUNDLE to serve or --url of a running server (one of them)")
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    concurrency = _numbers(args.concurrency, "--concurrency", int)
    if args.requests < 1 or args.max_batch_rows < 2 or args.rounds < 1:
        raise UserError("--requests and --rounds must be >= 1 and --max-batch-rows >= 2")
    size = args.size or _bundle_size(args.bundle)
    mix = Mix(
        tuple(_numbers(args.steps, "--steps", int)),
        tuple(s.strip() for s in args.schedulers.split(",")),
        tuple(_numbers(args.guidance, "--guidance", float)),
        size,
        args.seed,
    )
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": now(),
        "command": command_line(),
        "versions": versions(),
        "machine": machine("cpu", None),
        "load_average": _load_average(),
        "settings": {
            "bundle": args.bundle and Path(args.bundle).name,
            "url": args.url,
            "mix": vars(mix),
            "concurrency": concurrency,
            "requests": args.requests,
            "rounds": args.rounds,
            "max_batch_rows": args.max_batch_rows,
        },
    }
    if args.bundle:
        result["bound"] = unet_bound(Path(args.bundle), mix, args.max_batch_rows)
        result["bookkeeping"] = bookkeeping_share(Path(args.bundle), mix, active=16)
    first = ["url"] if args.url else modes
    if args.rate is None:  # continuous first: its capacity sets the Poisson rate of every mode
        first = sorted(first, key=lambda m: m != "continuous")
    runs, result["rounds"] = measure_rounds(args, first, mix, concurrency)
    result["modes"] = [merge_rounds(runs[m], concurrency) for m in (["url"] if args.url else modes)]
    result["targets"] = targets(result)
    result["load_average_after"] = _load_average()
    return result


def measure_rounds(
    args: argparse.Namespace, first: list[str], mix: Mix, concurrency: list[int]
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Every mode's rounds (see `measure_mode`), and each round's order and load average.
    Each round starts each mode's server afresh: a server process that happens to run fast or
    slow (placement, memory layout) then weighs on one round, not on every round of its mode."""
    rate, runs = args.rate, {mode: [] for mode in first}
    rounds: list[dict[str, Any]] = []
    for number, order in enumerate(round_orders(first, args.rounds), 1):
        rounds.append({"order": order, "load_average": _load_average()})
        for mode in order:
            log(f"serve: round {number}/{args.rounds}: {MODE_TITLES.get(mode, mode)}")
            server = start_server(args, mode)
            try:
                url = server.url if server else args.url.rstrip("/")
                runs[mode].append(measure_mode(args, url, mode, mix, concurrency, rate))
            finally:
                if server:
                    server.stop()
            rate = runs[mode][-1]["poisson_rate"]
    return runs, rounds


def start_server(args: argparse.Namespace, mode: str) -> Any:
    """`sdrt serve` in this mode, ready; None for --url (a running server)."""
    from .serve_process import ServeProcess

    if mode == "url":
        return None
    options = [*MODES[mode], "--max-queue", "100000", "--max-steps", "1000"]
    if "--max-batch-rows" not in options:
        options += ["--max-batch-rows", str(args.max_batch_rows)]
    log(f"serve: starting sdrt serve ({MODE_TITLES[mode]})")
    return ServeProcess([Path(args.bundle)], options).start()


def measure_mode(
    args: argparse.Namespace,
    url: str,
    mode: str,
    mix: Mix,
    concurrency: list[int],
    rate: float | None,
) -> dict[str, Any]:
    """One round of one mode: each closed-loop load point, then the Poisson one."""
    entry: dict[str, Any] = {"mode": mode, "closed": []}
    for clients in concurrency:
        log(f"serve: {mode}: closed loop, {clients} clients, {args.requests} requests")
        entry["closed"].append(drive(url, mix, args.requests, clients=clients))
    if rate is None:
        rate = 0.7 * entry["closed"][-1].requests_per_s
    entry["poisson_rate"] = rate
    if rate:
        log(f"serve: {mode}: Poisson arrivals at {rate:.2f}/s")
        entry["poisson"] = drive(url, mix, args.requests, rate=rate)
    return entry


def round_orders(first: list[str], rounds: int) -> list[list[str]]:
    """The order of the modes in each round: `first`, then reversed, and so on, so that no
    mode always runs first or last."""
    return [first if number % 2 == 0 else first[::-1] for number in range(rounds)]


def merge_rounds(runs: list[dict[str, Any]], concurrency: list[int]) -> dict[str, Any]:
    """One mode's rounds as one report entry: per load point, the figures over every round
    (see `summarize`)."""
    entry: dict[str, Any] = {
        "mode": runs[0]["mode"],
        "closed": [
            summarize([run["closed"][i] for run in runs], clients=clients, rate=0.0)
            for i, clients in enumerate(concurrency)
        ],
        "poisson_rate": runs[0]["poisson_rate"],
    }
    if "poisson" in runs[0]:
        entry["poisson"] = summarize(
            [run["poisson"] for run in runs], clients=0, rate=runs[0]["poisson_rate"]
        )
    return entry


@dataclass
class Sample:
    """What one load point measured: each request, the wall time, and the U-Net counters'
    growth (calls, rows, requests) on the server meanwhile."""

    records: list[dict[str, Any]]
    seconds: float
    unet: dict[str, float]

    @property
    def requests_per_s(self) -> float:
        return sum(r["ok"] for r in self.records) / self.seconds

    @property
    def images_per_s(self) -> float:
        return sum(r["images"] for r in self.records if r["ok"]) / self.seconds


def load_point(
    url: str, mix: Mix, count: int, clients: int = 0, rate: float = 0.0
) -> dict[str, Any]:
    """`drive` once, summarized."""
    return summarize([drive(url, mix, count, clients, rate)], clients=clients, rate=rate)


def drive(url: str, mix: Mix, count: int, clients: int = 0, rate: float = 0.0) -> Sample:
    """Send `count` requests: a closed loop of `clients`, or Poisson arrivals at `rate`/s.
    Latency counts from the arrival (open loop) or the send (closed loop)."""
    import httpx

    requests = mix.requests(count)
    before = unet_counters(url)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    client = httpx.Client(timeout=600)

    def send(body: dict[str, Any], arrival: float) -> None:
        try:
            response = client.post(f"{url}/v1/images/generations", json=body)
            ok = response.status_code == 200
            first = float(response.headers.get("x-sdrt-first-step-ms", "nan"))
            images = len(response.json()["data"]) if ok else 0
        except Exception:  # a failed request is a figure here, not a crash
            ok, first, images = False, float("nan"), 0
        with lock:
            records.append(
                {
                    "ok": ok,
                    "latency_ms": (time.perf_counter() - arrival) * 1e3,
                    "first_step_ms": first,
                    "images": images,
                }
            )

    start = time.perf_counter()
    if clients:
        queue = iter(requests)
        queue_lock = threading.Lock()

        def client_loop() -> None:
            while True:
                with queue_lock:
                    body = next(queue, None)
                if body is None:
                    return
                send(body, time.perf_counter())

        with ThreadPoolExecutor(clients) as pool:
            for _ in range(clients):
                pool.submit(client_loop)
    else:
        gaps = np.random.default_rng(mix.seed + 1).exponential(1.0 / rate, count)
        with ThreadPoolExecutor(64) as pool:
            arrival = time.perf_counter()
            for body, gap in zip(requests, gaps, strict=True):
                arrival += gap
                time.sleep(max(0.0, arrival - time.perf_counter()))
                pool.submit(send, body, arrival)
    elapsed = time.perf_counter() - start
    client.close()
    after = unet_counters(url)
    return Sample(records, elapsed, {k: after[k] - before[k] for k in after})


def summarize(samples: list[Sample], **load: Any) -> dict[str, Any]:
    """One load point over one or more rounds: requests/s and images/s as the median of the
    rounds (each round's kept, to show the spread); latency and U-Net figures over every
    request of every round."""
    records = [r for sample in samples for r in sample.records]
    good = [r for r in records if r["ok"]]
    calls = sum(sample.unet["calls"] for sample in samples)
    rows, requests = (sum(sample.unet[k] for sample in samples) for k in ("rows", "requests"))
    firsts = [r["first_step_ms"] for r in good if np.isfinite(r["first_step_ms"])]
    rates = [sample.requests_per_s for sample in samples]
    return {
        **load,
        "requests": len(records),
        "errors": len(records) - len(good),
        "seconds": sum(sample.seconds for sample in samples),
        "requests_per_s": statistics.median(rates),
        "requests_per_s_rounds": rates,
        "images_per_s": statistics.median(sample.images_per_s for sample in samples),
        "latency_ms": percentiles([r["latency_ms"] for r in good]) if good else None,
        "latencies_ms": sorted(r["latency_ms"] for r in good),
        "first_step_ms": percentiles(firsts) if firsts else None,
        "unet_calls": calls,
        "mean_rows_per_call": rows / calls if calls else None,
        "mean_requests_per_call": requests / calls if calls else None,
    }


def unet_counters(url: str) -> dict[str, float]:
    """U-Net calls, rows and requests so far, from the server's /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text

    def total(name: str) -> float:
        pattern = rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$"
        return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))

    return {
        "calls": total("sdrt_unet_call_seconds_count"),
        "rows": total("sdrt_unet_rows_per_call_sum"),
        "requests": total("sdrt_unet_requests_per_call_sum"),
    }


def unet_bound(bundle: Path, mix: Mix, max_rows: int, repeats: int = 30) -> dict[str, Any]:
    """U-Net rows/s at one guided request (2 rows) and at `max_rows`, on this bundle's
    engine in this process; their ratio bounds what batching can gain."""
    from sdrt import Pipeline

    pipe = Pipeline.load(bundle, device="cpu")
    args = pipe.arguments(**{**_pipeline_call(mix.requests(1)[0]), "guidance_scale": 7.5})
    (cond,) = pipe.conditionings([args])
    unet = pipe.engines["unet"]
    sample_shape = (1, pipe.manifest["unet_in_channels"], args.height // 8, args.width // 8)

    def rows_per_s(rows: int) -> float:
        feeds = {
            "sample": np.zeros((rows, *sample_shape[1:]), np.float32),
            "timestep": np.full(rows, 500.0, np.float32),
            **{k: np.repeat(v[:1], rows, axis=0) for k, v in cond.items()},
        }
        unet.run(feeds)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            unet.run(feeds)
            best = min(best, time.perf_counter() - start)
        return rows / best

    single, batched = rows_per_s(2), rows_per_s(max_rows)
    log(f"serve: U-Net {single:.0f} rows/s at 2 rows, {batched:.0f} at {max_rows}")
    return {
        "rows_per_s_one_request": single,
        "rows_per_s_max": batched,
        "max_rows": max_rows,
        "bound": batched / single,
    }


def bookkeeping_share(bundle: Path, mix: Mix, active: int) -> dict[str, Any]:
    """Share of a batcher tick spent outside the engines while `active` requests of the mix
    denoise together, run in process (no HTTP)."""
    from sdrt import Pipeline
    from sdrt.serve import Batcher

    pipe = Pipeline.load(bundle, device="cpu")
    batcher = Batcher(pipe, max_batch_rows=2 * active, max_queue=active)
    futures = [batcher.submit(_pipeline_call(body)) for body in mix.requests(active)]
    batcher.start()
    for future in futures:
        future.result()
    batcher.stop()
    ticks, tick_s, engine_s = batcher.stats().ticks_by_active.get(active, [0, 0.0, 0.0])
    share = (tick_s - engine_s) / tick_s if tick_s else None
    log(f"serve: bookkeeping at {active} active: {share and share * 100:.1f} % of a tick")
    return {
        "active": active,
        "ticks": ticks,
        "tick_ms": tick_s * 1e3 / max(ticks, 1),
        "share": share,
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The targets: throughput against the bound, tail latency against request-level
    batching, bookkeeping against the engines, and at one client no cost against the other
    modes."""
    modes = {m["mode"]: m for m in result["modes"]}
    out: dict[str, Any] = {}
    if {"none", "continuous"} <= set(modes) and "bound" in result:
        speedup = modes["continuous"]["closed"][-1]["requests_per_s"] / max(
            modes["none"]["closed"][-1]["requests_per_s"], 1e-9
        )
        bound = result["bound"]["bound"]
        out["continuous_over_none"] = {
            "speedup": speedup,
            "bound": bound,
            "of_bound": speedup / bound,
            "target": 0.9,
        }
    if {"request", "continuous"} <= set(modes) and modes["continuous"].get("poisson"):
        p99 = {m: modes[m]["poisson"]["latency_ms"]["p99"] for m in ("request", "continuous")}
        out["p99_continuous_vs_request"] = {
            **p99,
            "ratio": p99["continuous"] / p99["request"],
            "target": "< 1",
        }
    if 1 in result["settings"]["concurrency"] and "continuous" in modes:
        one = result["settings"]["concurrency"].index(1)
        continuous = modes["continuous"]["closed"][one]["requests_per_s_rounds"]
        out["continuous_at_one_client"] = {
            base: paired_ratios(continuous, modes[base]["closed"][one]["requests_per_s_rounds"])
            for base in ("none", "request")
            if base in modes
        }
        out["continuous_at_one_client"]["target"] = ONE_CLIENT_TARGET
    if result.get("bookkeeping", {}).get("share") is not None:
        out["bookkeeping_share"] = {"share": result["bookkeeping"]["share"], "target": 0.05}
    return out


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    """Round by round ratios (the two measured close together, under about the same load) and
    their median: steadier on a shared machine than a ratio of medians."""
    ratios = [n / max(d, 1e-9) for n, d in zip(numerators, denominators, strict=True)]
    return {"ratio": statistics.median(ratios), "rounds": ratios}


def _pipeline_call(body: dict[str, Any]) -> dict[str, Any]:
    """An HTTP request body as Pipeline keywords."""
    width, height = (int(v) for v in body["size"].split("x"))
    call = {k: v for k, v in body.items() if k != "size"}
    return {**call, "height": height, "width": width, "output_type": "np"}


def _bundle_size(bundle: str | None) -> str:
    if bundle is None:
        return "64x64"
    from sdrt.bundle import Bundle

    height, width = Bundle.load(bundle, verify_hashes=False).manifest["default_size"]
    return f"{width}x{height}"


def _numbers(text: str, flag: str, kind: type) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of numbers") from err
    if not values or min(values) <= 0:
        raise UserError(f"{flag} needs positive numbers, got {text!r}")
    return values


def _load_average() -> list[float] | None:
    try:
        with open("/proc/loadavg") as handle:
            return [float(v) for v in handle.read().split()[:3]]
    except OSError:
        return None
