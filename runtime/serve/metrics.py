"""Prometheus metrics: request counts and latency recorded by the HTTP layer, the batcher's
counters read from `Batcher.stats()` at each scrape (one registry per app, no globals)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from .batcher import Batcher

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self, batchers: Mapping[str, Batcher]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sdrt_requests",
            "HTTP image requests by model and status",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sdrt_request_latency_seconds",
            "Image request latency, accepted to answered",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(BatcherCollector(batchers))


class BatcherCollector:
    """Queue depth, active requests, U-Net rows and requests per call, U-Net call time and
    images generated, per model."""

    def __init__(self, batchers: Mapping[str, Batcher]) -> None:
        self.batchers = batchers

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("sdrt_queue_depth", "Requests waiting", labels=["model"])
        active = GaugeMetricFamily("sdrt_active_requests", "Requests denoising", labels=["model"])
        images = CounterMetricFamily("sdrt_images_generated", "Images returned", labels=["model"])
        rows = HistogramMetricFamily(
            "sdrt_unet_rows_per_call", "U-Net batch rows per call", labels=["model"]
        )
        requests = HistogramMetricFamily(
            "sdrt_unet_requests_per_call", "Requests sharing one U-Net call", labels=["model"]
        )
        unet = SummaryMetricFamily("sdrt_unet_call_seconds", "U-Net call time", labels=["model"])
        loras = GaugeMetricFamily("sdrt_lora_loaded", "Run-time LoRAs loaded", labels=["model"])
        adapters = HistogramMetricFamily(
            "sdrt_unet_adapters_per_call", "Distinct LoRAs in one U-Net call", labels=["model"]
        )
        for name, batcher in self.batchers.items():
            stats = batcher.stats()
            queue.add_metric([name], stats.queued)
            active.add_metric([name], stats.active)
            images.add_metric([name], stats.images)
            rows.add_metric([name], *_buckets(stats.rows_per_call))
            requests.add_metric([name], *_buckets(stats.requests_per_call))
            unet.add_metric([name], stats.unet_calls, stats.unet_seconds)
            pool = batcher.pipeline.adapters
            loras.add_metric([name], len(pool.names()) if pool is not None else 0)
            adapters.add_metric([name], *_buckets(stats.adapters_per_call))
        yield from (queue, active, images, rows, requests, unet, loras, adapters)


def _buckets(counts: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    """A Counter of observed integers as cumulative Prometheus buckets and their sum."""
    buckets = []
    for bound in COUNT_BUCKETS:
        cumulative = sum(n for value, n in counts.items() if value <= bound)
        buckets.append((str(bound), cumulative))
    buckets.append(("+Inf", sum(counts.values())))
    return buckets, float(sum(value * n for value, n in counts.items()))
