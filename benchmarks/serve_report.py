"""bench-serve.json, bench-serve.md (the comparison table, every figure against the U-Net
bound) and bench-serve.png (latency CDFs; throughput vs concurrency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdrt.atomic_files import atomic_file

from .report import table, write_report_files
from .serve_load import MODE_TITLES


def write_reports(result: dict[str, Any], out: Path) -> list[Path]:
    return write_report_files(result, out / "bench-serve", markdown(result), write_chart)


def markdown(result: dict[str, Any]) -> str:
    settings, mix = result["settings"], result["settings"]["mix"]
    lines = [
        f"# sdrt bench-serve: {settings['bundle'] or settings['url']}",
        "",
        f"{result['created']}, {result['machine']['device_name']} "
        f"({result['machine']['cpu_count']} CPUs), load average before "
        f"{_load(result['load_average'])}, after {_load(result.get('load_average_after'))}",
        f"`{result['command']}`",
        "",
        f"Mix: steps {mix['steps']}, schedulers {mix['schedulers']}, guidance {mix['guidance']}, "
        f"size {mix['size']}; {settings['requests']} requests per load point; "
        f"max U-Net batch {settings['max_batch_rows']} rows.",
        "",
        *_rounds(result),
    ]
    bound = result.get("bound")
    if bound:
        lines += [
            f"U-Net bound: {bound['rows_per_s_one_request']:.0f} rows/s at one guided request "
            f"(2 rows), {bound['rows_per_s_max']:.0f} rows/s at {bound['max_rows']} rows: "
            f"batching can gain at most **{bound['bound']:.2f}x**.",
            "",
        ]
    header = [
        "mode",
        "load",
        "req/s",
        "images/s",
        "latency p50 / p90 / p99 ms",
        "first U-Net step p50 / p99 ms",
        "rows per U-Net call",
        "errors",
    ]
    rows = []
    for entry in result["modes"]:
        points = [*entry["closed"], *([entry["poisson"]] if entry.get("poisson") else [])]
        for point in points:
            rows.append(_row(entry["mode"], point, bound))
    lines += table(header, rows) + [""]
    lines += _targets(result.get("targets", {}))
    return "\n".join(lines) + "\n"


def _rounds(result: dict[str, Any]) -> list[str]:
    """How the rounds ran, when there were several."""
    rounds = result.get("rounds", [])
    if len(rounds) < 2:
        return []
    orders = "; ".join(
        f"{', '.join(MODE_TITLES.get(m, m) for m in r['order'])} (load {_load(r['load_average'])})"
        for r in rounds
    )
    return [
        f"{len(rounds)} rounds, the modes interleaved: {orders}. req/s and images/s are the "
        "median over the rounds (lowest-highest round in brackets); latencies are over every "
        "round's requests.",
        "",
    ]


def _row(mode: str, point: dict[str, Any], bound: dict[str, Any] | None) -> list[str]:
    load = f"{point['clients']} clients" if point["clients"] else f"Poisson {point['rate']:.1f}/s"
    latency, first = point["latency_ms"], point["first_step_ms"]
    return [
        MODE_TITLES.get(mode, mode),
        load,
        _spread(point["requests_per_s"], point["requests_per_s_rounds"]),
        f"{point['images_per_s']:.2f}",
        "-" if latency is None else " / ".join(f"{latency[k]:.0f}" for k in ("p50", "p90", "p99")),
        "-" if first is None else f"{first['p50']:.0f} / {first['p99']:.0f}",
        "-" if point["mean_rows_per_call"] is None else f"{point['mean_rows_per_call']:.1f}",
        str(point["errors"]),
    ]


def _spread(median: float, rounds: list[float]) -> str:
    if len(rounds) < 2:
        return f"{median:.2f}"
    return f"{median:.2f} ({min(rounds):.2f}-{max(rounds):.2f})"


def _targets(targets: dict[str, Any]) -> list[str]:
    lines = ["Targets:", ""]
    speed = targets.get("continuous_over_none")
    if speed:
        lines.append(
            f"- continuous over no batching (req/s, top concurrency): {speed['speedup']:.2f}x = "
            f"{speed['of_bound'] * 100:.0f} % of the {speed['bound']:.2f}x bound "
            f"(target >= 90 %): {'met' if speed['of_bound'] >= 0.9 else 'missed'}"
        )
    p99 = targets.get("p99_continuous_vs_request")
    if p99:
        lines.append(
            f"- p99 at equal Poisson load: continuous {p99['continuous']:.0f} ms vs request-level "
            f"{p99['request']:.0f} ms ({p99['ratio']:.2f}x; target < 1): "
            f"{'met' if p99['ratio'] < 1 else 'missed'}"
        )
    one = targets.get("continuous_at_one_client")
    for base in ("none", "request"):
        if one and base in one:
            ratio, rounds = one[base]["ratio"], one[base]["rounds"]
            spread = f" (rounds {min(rounds):.2f}-{max(rounds):.2f})" if len(rounds) > 1 else ""
            lines.append(
                f"- continuous over {MODE_TITLES[base]} at one client (req/s, median of the "
                f"paired rounds): {ratio:.3f}x{spread} (target >= {one['target']:.2f}): "
                f"{'met' if ratio >= one['target'] else 'missed'}"
            )
    share = targets.get("bookkeeping_share")
    if share:
        lines.append(
            f"- batcher bookkeeping at 16 active requests: {share['share'] * 100:.1f} % of a tick "
            f"(target <= 5 %): {'met' if share['share'] <= 0.05 else 'missed'}"
        )
    return lines if len(lines) > 2 else []


def _load(values: list[float] | None) -> str:
    return "n/a" if not values else " ".join(f"{v:.2f}" for v in values)


def write_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (cdf, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for entry in result["modes"]:
        title = MODE_TITLES.get(entry["mode"], entry["mode"])
        top = entry["closed"][-1]
        for point, style, load in (
            (top, "-", f"{top['clients']} clients"),
            (entry.get("poisson"), "--", "Poisson"),
        ):
            if point and point["latencies_ms"]:
                values = np.asarray(point["latencies_ms"])
                cdf.plot(
                    values,
                    np.arange(1, len(values) + 1) / len(values),
                    style,
                    label=f"{title}, {load}",
                )
        closed = entry["closed"]
        rates = np.array([p["requests_per_s"] for p in closed])
        throughput.errorbar(  # the bars span the lowest to the highest round
            [p["clients"] for p in closed],
            rates,
            yerr=[
                rates - [min(p["requests_per_s_rounds"]) for p in closed],
                [max(p["requests_per_s_rounds"]) for p in closed] - rates,
            ],
            fmt="o-",
            capsize=3,
            label=title,
        )
    cdf.set(xlabel="latency (ms)", ylabel="share of requests", title="latency CDF")
    throughput.set(
        xlabel="concurrent clients", ylabel="requests/s", title="throughput vs concurrency"
    )
    for axis in (cdf, throughput):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"sdrt bench-serve on {result['machine']['device_name']}")
    figure.tight_layout()
    with atomic_file(path) as f:
        figure.savefig(f, format="png", dpi=110)
    plt.close(figure)
