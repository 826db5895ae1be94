"""Cold start: how long a fresh process takes to import sdrt and load a bundle.

    python -m sdrt.benchmarks.cold_start BUNDLE [--device cpu] [--threads 2] [--runs 3]

Each run is a new Python process (`cold_start_child.py`), as a new server replica is. With the
default graph cache (a fresh temporary folder, removed afterwards) the first run optimizes each
graph and stores it, and the later runs load the stored graphs; `--graph-cache DIR` uses (and
keeps) a folder of your own, `--graph-cache off` optimizes at every load. The OS page cache is
not dropped: after the first run the bundle's files are read from memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sdrt.errors import UserError

from . import report
from .environment import command_line, machine, now, versions

CHILD = Path(__file__).with_name("cold_start_child.py")


def run_once(bundle: Path, device: str, verify: bool, options: dict[str, Any]) -> dict[str, Any]:
    """One cold start in a fresh interpreter; its JSON report."""
    request = {"bundle": str(bundle), "device": device, "verify": verify, "options": options}
    done = subprocess.run(
        [sys.executable, str(CHILD), json.dumps(request)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise UserError(f"a cold start of {bundle} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(
    bundle: Path,
    device: str,
    runs: int,
    threads: int | None,
    graph_cache: str | None,
    verify: bool,
) -> dict[str, Any]:
    """`runs` cold starts in a row, sharing one graph cache folder."""
    if runs < 1:
        raise UserError(f"--runs must be >= 1, got {runs}")
    temporary = graph_cache is None
    folder = tempfile.mkdtemp(prefix="sdrt-cold-start-") if temporary else graph_cache
    options: dict[str, Any] = {"graph_cache": folder}
    if threads is not None:
        options["threads"] = threads
    started, load_average = now(), os.getloadavg()
    try:
        results = [run_once(bundle, device, verify, options) for _ in range(runs)]
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "bundle": str(bundle),
        "device": device,
        "threads": threads,
        "graph_cache": "temporary" if temporary else graph_cache,
        "verify": verify,
        "runs": results,
        "date": started,
        "load_average": [round(v, 2) for v in load_average],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "machine": machine(device, None),
        "versions": versions(),
        "command": command_line(),
    }


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per run; times in seconds, each part of the load in milliseconds."""
    parts = list(result["runs"][0]["load_ms"])
    header = ["run", "graph cache", "import s", "load s", "ready s"]
    header += [f"{p} ms" for p in parts] + ["CPU s", "peak RSS GiB"]
    rows = []
    for number, run in enumerate(result["runs"], 1):
        statuses = sorted({s for engine in run["graph_cache"].values() for s in engine.values()})
        cells = [
            str(number),
            "/".join(statuses) or "-",
            f"{run['import_s']:.2f}",
            f"{run['load_s']:.2f}",
            f"{run['import_s'] + run['load_s']:.2f}",
            *(f"{run['load_ms'].get(p, 0):.0f}" for p in parts),
            f"{run['cpu_s']:.1f}",
            f"{run['max_rss_mib'] / 1024:.2f}",
        ]
        rows.append(cells)
    lines = report.table(header, rows)
    lines.append(
        f"\n{result['date']}, {result['machine']['cpu']} x{result['machine']['cpu_count']}, "
        f"onnxruntime {result['versions']['onnxruntime']}, threads "
        f"{result['threads'] or 'default'}, hash checks {'on' if result['verify'] else 'off'}, "
        f"load average {result['load_average']} before, {result['load_average_after']} after"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdrt.benchmarks.cold_start", description=__doc__.splitlines()[0]
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per session")
    parser.add_argument("--runs", type=int, default=3, help="cold starts in a row (default 3)")
    parser.add_argument(
        "--graph-cache",
        metavar="DIR|off",
        help="graph cache folder to use and keep, or off (default: a fresh temporary folder)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    try:
        result = measure(
            args.bundle, args.device, args.runs, args.threads, args.graph_cache, not args.no_verify
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        report.write_json(result, args.json)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
