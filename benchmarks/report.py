"""Write a benchmark result three ways: bench.json for machines, bench.md for people, and
bench.png, a bar chart of end-to-end and denoiser step times per path."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdrt.atomic_files import atomic_file, write_atomic

STAGE_TITLES = {
    "text_encoder": "text encoder",
    "unet_step": "denoiser step",
    "vae_decode": "VAE decode",
}
CPU_NOTE = (
    "Measured on the CPU: these timings are for relative comparison between rows only; "
    "they say nothing about GPU deployment speed."
)

STOCHASTIC_NOTE = (
    "This scheduler draws fresh noise every step, and diffusers and sdrt draw it differently: "
    "the diff column measures that, not the engines. Compare outputs with a deterministic "
    "scheduler (pndm, ddim, euler)."
)


def write_reports(result: dict[str, Any], out: Path) -> list[Path]:
    return write_report_files(result, out / "bench", markdown(result), write_chart)


def write_report_files(
    result: dict[str, Any], stem: Path, text: str, chart: Callable[[dict[str, Any], Path], None]
) -> list[Path]:
    """STEM.json (machines), STEM.md (people) and STEM.png (the chart), each written whole."""
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    write_json(result, paths[0])
    write_atomic(paths[1], text)
    chart(result, paths[2])
    return paths


def write_json(result: dict[str, Any], path: Path) -> None:
    """Strict JSON: an infinite PSNR (identical images) is written as null. bench.json is
    rewritten after every path; a run killed mid-write keeps the last good one."""
    write_atomic(path, json.dumps(_finite(result), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def measured(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in result["paths"] if p["status"] == "ok"]


def markdown(result: dict[str, Any]) -> str:
    settings, machine = result["settings"], result["machine"]
    lines = [
        f"# sdrt bench: {settings['model']} on {machine['device_name']}",
        "",
        f"{result['date']}, `{result['command']}`; {machine['cpu_count']} CPU cores, load "
        f"average {machine['load_average_1min']:.1f} at the start",
        "",
        f"{settings['steps']} {settings['scheduler']} steps, {settings['height']}x"
        f"{settings['width']}, guidance {settings['guidance']}, {settings['dtype']}, "
        f"{settings['warmup']} warm-up + {settings['iterations']} timed calls per figure; "
        "times in ms as p50 / p90 / p99, end to end at batch 1.",
        "",
    ]
    if machine["device"] == "cpu":
        lines += [f"> {CPU_NOTE}", ""]
    if result["workload"]["stochastic_scheduler"]:
        lines += [f"> {STOCHASTIC_NOTE}", ""]
    lines += table(
        ["path", *STAGE_TITLES.values(), "end to end", "speedup vs eager", "peak memory", "diff"],
        [_timing_row(p) for p in measured(result)],
    )
    batches = settings["batch_sizes"]
    lines += [""] + table(
        ["path", *(f"images/s @ {b}" for b in batches), "build s", "load s", "first call ms"]
        + ["loop overhead"],
        [_setup_row(p, batches) for p in measured(result)],
    )
    lines += [
        "",
        "build: ONNX export and parity check for sdrt rows (empty when --bundle was given); "
        "for torch.compile its first call, compilation included (shorter when inductor's "
        "on-disk cache holds earlier runs). Other batch sizes recompile during their warm-up. "
        "Loop overhead: end to end minus time inside engines (sdrt's own stage timings).",
        "",
        "Peak memory, how each row measured it:",
        "",
    ]
    lines += [f"- {p['name']}: {_memory_method(p['memory'])}" for p in measured(result)]
    unmeasured = [p for p in result["paths"] if p["status"] != "ok"]
    if unmeasured:
        lines += ["", "Not measured:", ""]
        lines += [f"- {p['name']} ({p['status']}): {p['reason']}" for p in unmeasured]
    return "\n".join(lines) + "\n"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _timing_row(path: dict[str, Any]) -> list[str]:
    diff = path.get("diff_vs_eager")
    return [
        path["name"],
        *(_triple(path["stages_ms"][stage]) for stage in STAGE_TITLES),
        _triple(path["end_to_end_ms"]),
        _number(path.get("speedup_vs_eager"), "{:.2f}x"),
        _mib(path["memory"]["peak_bytes"]),
        "-" if diff is None else f"max abs {diff['max_abs']:.1e}, PSNR {_psnr(diff['psnr_db'])}",
    ]


def _setup_row(path: dict[str, Any], batches: list[int]) -> list[str]:
    per_batch = {t["batch_size"]: t["images_per_s"] for t in path["throughput"]}
    overhead = path.get("loop_overhead")
    return [
        path["name"],
        *(_number(per_batch.get(b), "{:.2f}") for b in batches),
        _number(path.get("build_s"), "{:.1f}"),
        _number(path.get("load_s"), "{:.2f}"),
        _number(path["first_call_ms"], "{:.1f}"),
        "-" if overhead is None else f"{overhead['ms']:.2f} ms ({overhead['percent']:.1f} %)",
    ]


def _triple(figures: dict[str, float]) -> str:
    return " / ".join(f"{figures[k]:.2f}" for k in ("p50", "p90", "p99"))


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def _mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**20:.0f} MiB"


def _memory_method(memory: dict[str, Any]) -> str:
    reason = memory.get("reason")
    return memory["method"] + (f" (not available: {reason})" if reason else "")


def _psnr(db: float | None) -> str:
    return "inf" if db is None or not math.isfinite(db) else f"{db:.1f} dB"


def write_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = measured(result)
    names = [p["name"] for p in rows]
    panels = [
        ("end to end, batch 1 (p50 ms)", [p["end_to_end_ms"]["p50"] for p in rows]),
        ("one denoiser step (p50 ms)", [p["stages_ms"]["unet_step"]["p50"] for p in rows]),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.6 * max(len(rows), 1)))
    for axis, (title, values) in zip(axes, panels, strict=True):
        bars = axis.barh(names, values, color="tab:blue")
        axis.bar_label(bars, fmt="%.2f", padding=3)
        axis.set_title(title)
        axis.invert_yaxis()  # first path on top, as in the table
        axis.margins(x=0.2)
    cpu = " (CPU: for relative comparison only)" if result["machine"]["device"] == "cpu" else ""
    figure.suptitle(
        f"sdrt bench: {result['settings']['model']} on {result['machine']['device_name']}{cpu}"
    )
    figure.tight_layout()
    with atomic_file(path) as f:
        figure.savefig(f, format="png", dpi=110)
    plt.close(figure)
