"""Peak RSS of `sdrt export` per stage and per component, with the time each stage takes.

    python -m sdrt.benchmarks.export_memory sd15 [--dtype fp16] [--fused-attention] ...

Runs the real export of a random-weight preset into a temporary folder (deleted afterwards)
and prints one row per stage. A stage's peak is exact where it set the process's new
high-water mark, else the largest RSS sampled every 20 ms (marked "~"). Measure one export per
process: the high-water mark never goes down.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sdrt.cli import add_graph_options, parse_size
from sdrt.export.stages import GIB, StageRecord, StageWatch, peak_bytes, rss_bytes


def measure(preset: str, options: argparse.Namespace, progress: bool = False) -> dict[str, Any]:
    """Load `preset` with random weights and export it, watching every stage."""
    from sdrt.export import bundle_writer
    from sdrt.export.load import opened_pipeline
    from sdrt.export.presets import PRESETS

    watch = StageWatch(on_record=_print_record)
    started = time.perf_counter()
    start_rss = rss_bytes()
    with ExitStack() as stack:
        with watch.stage("pipeline", "load"):  # a full-size transformer: its random folder
            pipe = stack.enter_context(opened_pipeline(None, preset, progress=progress))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="export-memory-"))
        manifest = bundle_writer.export_bundle(
            pipe,
            Path(tmp) / "bundle",
            PRESETS[preset]["family"],
            options.dtype,
            options.tolerance,
            progress=progress,
            fused_attention=options.fused_attention,
            static_sizes=[parse_size(s, "--static-size") for s in options.static_size],
            cuda_fusions=options.cuda_fusions,
            watch=watch,
            release_weights=True,  # as `sdrt export` does
        )
    return {
        "preset": preset,
        "dtype": options.dtype,
        "fused_attention": options.fused_attention,
        "cuda_fusions": options.cuda_fusions,
        "static_sizes": options.static_size,
        "start_rss_bytes": start_rss,
        "peak_rss_bytes": peak_bytes(),
        "seconds": time.perf_counter() - started,
        "stages": [vars(r) for r in watch.records],
        "component_peaks": watch.component_peaks(),
        "parity": {
            name: {"precision": entry["precision"], **entry["parity"]}
            for name, entry in manifest["components"].items()
        },
    }


def _print_record(r: StageRecord) -> None:
    mark = "" if r.exact else "~"
    print(
        f"{r.component}: {r.stage} {mark}{r.peak_bytes / GIB:.2f} GiB {r.seconds:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per stage, then each component's peak, the total and the time."""
    lines = ["| component | stage | peak RSS (GiB) | time (s) |", "|---|---|---|---|"]
    for r in result["stages"]:
        mark = "" if r["exact"] else "~"
        gib = f"{mark}{r['peak_bytes'] / GIB:.2f}"
        lines.append(f"| {r['component']} | {r['stage']} | {gib} | {r['seconds']:.1f} |")
    lines += ["", "| component | peak RSS (GiB) |", "|---|---|"]
    lines += [f"| {c} | {b / GIB:.2f} |" for c, b in result["component_peaks"].items()]
    lines += [
        "",
        "| component | precision | max abs | max rel (vs PyTorch fp32) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {p['precision']} | {p['max_abs']:.2e} | {p['max_rel']:.2e} |"
        for c, p in result["parity"].items()
    ]
    lines += [
        "",
        f"process peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB "
        f"(at start {result['start_rss_bytes'] / GIB:.2f} GiB), "
        f"total {result['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdrt.benchmarks.export_memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("preset", help="random-weight preset: tiny, sd15, sd21, sdxl, ...")
    add_graph_options(parser)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--progress", action="store_true", help="show the export progress bar")
    args = parser.parse_args(argv)
    result = measure(args.preset, args, progress=args.progress)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
